"""What 8-bit KV pages and 8-bit weights cost in accuracy: perplexity and greedy top-1
agreement with float32 pages and weights, per kv_cache_dtype (fp8 with scale 1.0 or
calibrated by calculate_kv_scales) and per weight quantization, on held-out English text.

The text is a licence that ships with the OS (Debian's /usr/share/common-licenses/GPL-3 by
default): its tokens are cut into windows, and each window is scored through the engine's
prompt logprobs with chunked prefill in small chunks, so every chunk's queries read the
earlier chunks' K/V from the (quantized) pages, as decode steps do. Each position gives the
logprob of the text's next token (perplexity) and the model's top-1 token (agreement with the
float32 pages' top-1). All runs use the XLA attention path, so the pages (or the weights)
are the only difference.

The reference (--hf_dtypes): transformers' model in float32 over the same windows, its keys
(after rope) and values rounded as each page dtype stores them, written here in torch apart
from paged_jax (fp8: a cast to torch's float8 and back; int8: each token and head's row
against its float16 scale). Its perplexity change and agreement are the format's own cost on
this model; the engine's rows should match them.

  python -m experiments.kv_cache_dtype_accuracy --out_dir=/tmp/kv_cache_dtype_accuracy
"""
from __future__ import annotations

import math
import pathlib
import time

import numpy as np
from absl import app, flags

from experiments.results_file import publish

FLAGS = flags.FLAGS


def score(model, windows, kv_cache_dtype: str, chunk: int, calibrated: bool = False):
    """(the text tokens' logprobs, the top-1 tokens), position by position, and seconds."""
    from paged_jax import LLMEngine, SamplingParams
    from paged_jax.config import EngineConfig

    engine = LLMEngine(EngineConfig(kv_cache_dtype=kv_cache_dtype, attention_backend="xla",
                                    calculate_kv_scales=calibrated,
                                    enable_chunked_prefill=True, max_num_batched_tokens=chunk,
                                    max_model_len=max(len(w) for w in windows) + 8,
                                    max_num_seqs=4, enable_prefix_caching=False), model=model)
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    start = time.perf_counter()
    for i, w in enumerate(windows):
        engine.add_request(str(i), {"prompt_token_ids": w}, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    logprobs, top1 = [], []
    for i, w in enumerate(windows):
        for token, entry in zip(w[1:], done[str(i)].prompt_logprobs[1:]):
            logprobs.append(entry[token].logprob)
            top1.append(next(t for t, lp in entry.items() if lp.rank == 1))
    return np.array(logprobs), np.array(top1), time.perf_counter() - start


def rounded_as_stored(x, kv_cache_dtype: str):
    """torch x [..., D] (float32) -> the values pages of kv_cache_dtype give back (scale 1.0
    for fp8, as the engine's default)."""
    import torch

    if kv_cache_dtype == "auto":
        return x
    if kv_cache_dtype in ("fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16"):
        dtype = {"fp8_e5m2": torch.float8_e5m2, "bfloat16": torch.bfloat16}.get(
            kv_cache_dtype, torch.float8_e4m3fn)
        top = torch.finfo(dtype).max  # saturated, as the pages are (torch's cast is not)
        return x.clamp(-top, top).to(dtype).to(torch.float32)
    if kv_cache_dtype == "int8":
        top = torch.finfo(torch.float16).max
        scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(max=top).to(
            torch.float16).to(torch.float32)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.clamp(torch.round(x / safe), -127, 127) * scale
    raise ValueError(f"no emulation of kv_cache_dtype {kv_cache_dtype!r}")


def hf_score(folder, windows, kv_cache_dtype: str):
    """As score(), from transformers' model with its K/V rounded as the pages would hold
    them: keys after rope (as the engine writes them), values as projected."""
    import torch
    import transformers
    from transformers.models.llama import modeling_llama

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder),
                                                              dtype=torch.float32).eval()
    if model.config.model_type != "llama":
        raise ValueError(f"the transformers reference emulates Llama models, got "
                         f"{model.config.model_type}")
    head_dim = (getattr(model.config, "head_dim", None)
                or model.config.hidden_size // model.config.num_attention_heads)
    rope = modeling_llama.apply_rotary_pos_emb

    def rope_then_round(q, k, *args, **kwargs):
        q, k = rope(q, k, *args, **kwargs)
        return q, rounded_as_stored(k, kv_cache_dtype)

    def round_values(module, inputs, out):  # [B, T, Hkv * D] -> rows of D
        return rounded_as_stored(out.unflatten(-1, (-1, head_dim)), kv_cache_dtype).flatten(-2)

    hooks = [layer.self_attn.v_proj.register_forward_hook(round_values)
             for layer in model.model.layers]
    modeling_llama.apply_rotary_pos_emb = rope_then_round
    logprobs, top1 = [], []
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for w in windows:
                logits = model(torch.tensor([w])).logits[0, :-1].float()
                lp = torch.log_softmax(logits, -1)
                logprobs.append(lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].numpy())
                top1.append(lp.argmax(-1).numpy())
    finally:
        modeling_llama.apply_rotary_pos_emb = rope
        for h in hooks:
            h.remove()
    return np.concatenate(logprobs), np.concatenate(top1), time.perf_counter() - start


def param_bytes(params) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def main(argv):
    del argv
    from paged_jax import kv_cache
    from paged_jax.models.loader import load_model

    model = load_model(FLAGS.model)
    ids = model.tokenizer.encode(pathlib.Path(FLAGS.text).read_text())[:FLAGS.tokens]
    windows = [ids[i:i + FLAGS.window] for i in range(0, len(ids), FLAGS.window)]
    windows = [w for w in windows if len(w) > 1]
    runs = {}
    for name in FLAGS.dtypes:
        dtype, _, how = name.partition(":")
        logprobs, top1, seconds = score(model, windows, dtype, FLAGS.chunk,
                                        calibrated=how == "calibrated")
        runs[name] = dict(perplexity=math.exp(-logprobs.mean()), top1=top1, seconds=seconds,
                          block_bytes=kv_cache.block_bytes(model.config, 16, dtype))
    for quant in FLAGS.weight_quantizations:
        quantized = load_model(FLAGS.model, quantization=quant)
        logprobs, top1, seconds = score(quantized, windows, FLAGS.dtypes[0], FLAGS.chunk)
        runs[f"weights {quant}"] = dict(
            perplexity=math.exp(-logprobs.mean()), top1=top1, seconds=seconds,
            block_bytes=kv_cache.block_bytes(model.config, 16, FLAGS.dtypes[0]),
            weight_bytes=param_bytes(quantized.params))
    hf = {}
    if FLAGS.hf_dtypes:
        from paged_jax.weights import resolve_model

        for name in FLAGS.hf_dtypes:
            logprobs, top1, seconds = hf_score(resolve_model(FLAGS.model), windows, name)
            hf[name] = dict(perplexity=math.exp(-logprobs.mean()), top1=top1, seconds=seconds)
    ref = runs[FLAGS.dtypes[0]]
    rows, results = [], {"text": FLAGS.text, "tokens": int(sum(len(w) - 1 for w in windows)),
                         "window": FLAGS.window, "chunk": FLAGS.chunk, "dtypes": {}}
    for name, r in runs.items():
        agree = float(np.mean(r["top1"] == ref["top1"]))
        change = r["perplexity"] / ref["perplexity"] - 1
        results["dtypes"][name] = dict(perplexity=r["perplexity"], perplexity_change=change,
                                       top1_agreement=agree, block_bytes=r["block_bytes"],
                                       seconds=r["seconds"],
                                       weight_bytes=r.get("weight_bytes",
                                                          param_bytes(model.params)))
        rows.append(f"{name:>20}  ppl {r['perplexity']:8.4f} ({change:+.2%})  top-1 agreement "
                    f"{agree:.2%}  {r['block_bytes']:>7} bytes per 16-token block  "
                    f"{r['seconds']:.0f} s")
    results["transformers"] = {}
    for name, r in hf.items():
        base = hf[FLAGS.hf_dtypes[0]]
        change = r["perplexity"] / base["perplexity"] - 1
        agree = float(np.mean(r["top1"] == base["top1"]))
        engine = runs.get(name)  # the engine's run of the same page dtype, if any
        same = float(np.mean(engine["top1"] == r["top1"])) if engine else None
        results["transformers"][name] = dict(perplexity=r["perplexity"],
                                             perplexity_change=change, top1_agreement=agree,
                                             top1_same_as_engine=same, seconds=r["seconds"])
        rows.append(f"{'transformers ' + name:>20}  ppl {r['perplexity']:8.4f} "
                    f"({change:+.2%})  top-1 agreement {agree:.2%}"
                    + (f"  top-1 as the engine's {name}: {same:.2%}" if same is not None
                       else "") + f"  {r['seconds']:.0f} s")
    report = (f"{results['tokens']} tokens of {FLAGS.text} in windows of {FLAGS.window}, "
              f"chunks of {FLAGS.chunk}; reference: {FLAGS.dtypes[0]}\n" + "\n".join(rows))
    publish(FLAGS.out_dir, results, report)


def define_flags() -> None:
    """(Here rather than at import, so tests can import this module beside others.)"""
    flags.DEFINE_string("model", None, "a model folder or GGUF (default: the embedded SmolLM2)")
    flags.DEFINE_string("text", "/usr/share/common-licenses/GPL-3", "held-out English text")
    flags.DEFINE_integer("tokens", 4096, "tokens of the text to score")
    flags.DEFINE_integer("window", 1024, "tokens per scored request")
    flags.DEFINE_integer("chunk", 64, "chunked-prefill chunk (max_num_batched_tokens)")
    flags.DEFINE_list("dtypes", ["auto", "bfloat16", "fp8_e4m3", "fp8_e4m3:calibrated",
                                "fp8_e5m2", "fp8_e5m2:calibrated", "int8"],
                      "kv_cache_dtype values (fp8 ones with :calibrated for "
                      "calculate_kv_scales); the first is the reference")
    flags.DEFINE_list("weight_quantizations", ["int8"], "weight quantizations, each run with "
                      "the reference's KV pages")
    flags.DEFINE_list("hf_dtypes", ["auto", "fp8_e4m3", "fp8_e5m2", "int8"],
                      "page dtypes to emulate in transformers as the reference (the first: none)")
    flags.DEFINE_string("out_dir", "results/kv_cache_dtype_accuracy", "where results.json goes")


if __name__ == "__main__":
    define_flags()
    app.run(main)
