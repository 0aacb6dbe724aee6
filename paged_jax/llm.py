"""The offline entry point, named as vLLM names it: LLM(...).generate / .chat / .beam_search."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import jax
from tqdm.auto import tqdm

from paged_jax import beam_search as beam
from paged_jax.config import EngineConfig
from paged_jax.engine import LLMEngine
from paged_jax.request import RequestOutput
from paged_jax.sampling_params import SamplingParams
from paged_jax.tokenizer import apply_chat_template


class LLM:
    def __init__(self, model: str | None = None, **engine_options):
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_options))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate and chat sample with when given no SamplingParams: SamplingParams'
        defaults, overridden by the model's generation_config.json (--generation-config)."""
        return self.llm_engine.default_sampling_params()

    def reset_prefix_cache(self) -> None:
        """Forget every block kept by the prefix cache, as vLLM's LLM.reset_prefix_cache."""
        self.llm_engine.reset_prefix_cache()

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None
                 = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or {"prompt_token_ids": [...]} dicts.
        One SamplingParams for all prompts or a list with one per prompt. Outputs come back
        in the order of the prompts."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = [str(next(self._ids)) for _ in prompts]
        # Only finished outputs are returned: the engine builds none for the steps between.
        params = [dataclasses.replace(p, output_kind="final_only") for p in params]
        engine.add_requests(list(zip(ids, prompts, params)))  # a bad prompt refuses them all
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, *, chat_template: str | None = None,
             chat_template_kwargs: dict | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None
             ) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"}) or a list of them,
        rendered with chat_template (a Jinja template; default: the tokenizer's) and its
        extra variables chat_template_kwargs. tools: OpenAI tool definitions shown to the
        template (the text is not parsed for calls here, as in vLLM's LLM.chat).
        continue_final_message: the last (assistant) message is continued, not answered."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts = [{"prompt_token_ids": apply_chat_template(
            tok, c, add_generation_prompt=add_generation_prompt, tools=tools,
            chat_template=chat_template, continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(self, prompts, params: beam.BeamSearchParams) -> list[beam.BeamSearchOutput]:
        """Beam search over each prompt (a string, token ids or {"prompt_token_ids": ...}),
        vLLM V1's algorithm (paged_jax/beam_search.py): one pass of the engine per generated
        position, the beams sharing their KV blocks through the prefix cache."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        engine = self.llm_engine
        token_lists = [engine.tokenize(p)[1] for p in prompts]
        for ids in token_lists:
            if len(ids) + params.max_tokens > engine.max_model_len:
                raise ValueError(f"a prompt of {len(ids)} tokens plus max_tokens "
                                 f"{params.max_tokens} exceeds max_model_len "
                                 f"{engine.max_model_len}")
        step = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                              logprobs=2 * params.beam_width)

        def top_logprobs(beams: list[list[int]]) -> list[dict[int, float]]:
            outs = self.generate([{"prompt_token_ids": b} for b in beams], step, use_tqdm=False)
            return [{t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()}
                    for o in outs]

        outputs = beam.beam_search(token_lists, params, top_logprobs,
                                   engine.model.eos_token_ids)
        tok = self.get_tokenizer()
        for ids, out in zip(token_lists, outputs):
            for seq in out.sequences:
                if tok is not None:
                    seq.text = tok.decode(seq.tokens[len(ids):], skip_special_tokens=True)
        return outputs

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine, wanted, done = self.llm_engine, set(ids), {}
        # In a multi-host run every process generates; only process 0 shows progress.
        bar = tqdm(total=len(ids), desc="Processed prompts",
                   disable=not use_tqdm or jax.process_index() != 0)
        try:
            while len(done) < len(ids) and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            leftover = [i for i in ids if i not in done]
            if leftover:
                engine.abort_request(leftover)
        return [done[i] for i in ids]
