"""Writes the notebooks in this folder (unexecuted): python notebooks/make_notebooks.py

Each notebook runs top to bottom on the CPU in a few minutes. Environment variables shrink
them for CI (tests/test_notebooks.py):
  PAGED_JAX_NB_MODEL     a model folder instead of the embedded SmolLM2 (01, 03)
  PAGED_JAX_NB_REQUESTS  requests in the memory-waste trace (02; default 2000)
  PAGED_JAX_NB_RESULTS   the batching results.json to plot (03; run if missing)
"""
from __future__ import annotations

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent

SETUP = """\
import os, pathlib, sys
# Run from the repository root whether Jupyter started here or in notebooks/.
ROOT = pathlib.Path.cwd()
if not (ROOT / "paged_jax").is_dir():
    ROOT = ROOT.parent
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))
MODEL = os.environ.get("PAGED_JAX_NB_MODEL") or None  # None: the embedded SmolLM2-135M"""

QUICKSTART = [
    new_markdown_cell("""\
# paged-jax quickstart

Load SmolLM2-135M-Instruct (embedded in the package as a GGUF file, converted on first use),
generate with vLLM's offline API, then look inside the paged KV cache: each request's
**block table** maps its logical blocks to physical blocks of one shared **pool**, allocated
on demand as the sequence grows (PagedAttention, Kwon et al. 2023)."""),
    new_code_cell(SETUP),
    new_code_cell("""\
import time
from paged_jax import LLM, SamplingParams

start = time.perf_counter()
llm = LLM(MODEL, max_model_len=256, max_num_seqs=8, num_kv_blocks=64, block_size=16)
engine = llm.llm_engine
snap = engine.snapshot()  # the engine's state, frozen: queues, KV pool, counters
print(f"loaded {engine.model_path} in {time.perf_counter() - start:.1f} s")
print(f"{snap.kv.total_blocks} usable KV blocks of {snap.block_size} tokens")"""),
    new_markdown_cell("## Generate"),
    new_code_cell("""\
outs = llm.chat([[{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "user", "content": "Write a haiku about autumn."}]],
                SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
for o in outs:
    print(repr(o.outputs[0].text), o.outputs[0].finish_reason)"""),
    new_markdown_cell("""\
## Inside the cache

Add two requests and run a few engine steps by hand. After the prefill step each request
holds just enough blocks for its prompt; decode steps add a block whenever the last one
fills. The device cache is one `[kv_heads, num_blocks, block_size, head_dim]` array per layer
for K and for V; `slot = block_id * block_size + offset` addresses one token's K/V in it."""),
    new_code_cell("""\
rng = __import__("numpy").random.default_rng(0)
prompts = {"a": rng.integers(100, 40000, 20).tolist(), "b": rng.integers(100, 40000, 35).tolist()}
for rid, ids in prompts.items():
    engine.add_request(rid, {"prompt_token_ids": ids},
                       SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))

def show(label):
    snap = engine.snapshot(with_requests=True)
    print(f"{label}: pool {snap.kv.used_blocks} used / {snap.num_free_blocks} free; "
          f"token states {snap.kv.token_states} of {snap.kv.token_slots} allocated slots")
    for r in snap.requests:
        print(f"  {r.request_id}: {r.num_tokens:3d} tokens -> block table {list(r.block_table)}")

show("before any step")
engine.step()  # prefill: both prompts
show("after the prefill")
for _ in range(14):
    engine.step()  # decode: one token each
show("after 14 decode steps")"""),
    new_markdown_cell("""\
The pool as a picture: one cell per block, coloured by the request that holds it (black:
shared by several, grey: free but still cached for later prefix hits). `paged-jax serve`
shows the same grid live at `/dashboard`."""),
    new_code_cell("""\
from paged_jax.kv_view import plot_kv_pool

plot_kv_pool(llm, columns=16);"""),
    new_code_cell("""\
k0, v0 = engine.runner.kv_caches[0]
print("layer 0 K cache:", k0.shape, k0.dtype, "(kv_heads, num_blocks, block_size, head_dim)")
a = next(r for r in engine.snapshot(with_requests=True).requests if r.request_id == "a")
bs = engine.snapshot().block_size
print("slots of request a's first 3 tokens:", [a.block_table[i // bs] * bs + i % bs for i in range(3)])
print("block 0 is the padding block; no request gets it:", 0 not in a.block_table)
while engine.has_unfinished_requests():
    engine.step()
show("finished (blocks back in the pool)")
snap = engine.snapshot()
print("free blocks:", snap.num_free_blocks, "of", snap.kv.total_blocks)"""),
]

MEMORY_WASTE = [
    new_markdown_cell("""\
# Where KV memory goes (paper Fig. 2)

A seeded ShareGPT-like trace (the paper's mean lengths, log-normal) is pushed through the
real scheduler with no model: Orca's up-front reservations (Max, Pow2, Oracle, each placed in
contiguous buddy-allocator ranges) against paged allocation on demand. Every step the KV
memory in use is split into token states, reservations, internal and external fragmentation.
The capacity is OPT-13B's KV on an A100-40GB (15,728 token slots)."""),
    new_code_cell(SETUP),
    new_code_cell("""\
import tempfile
from experiments import memory_waste as mw

N = int(os.environ.get("PAGED_JAX_NB_REQUESTS", "2000"))
out_dir = tempfile.mkdtemp(prefix="memory_waste_")
results = mw.run("sharegpt", N, block_size=16, kv_tokens=15728, max_model_len=2048, seed=0,
                 out_dir=out_dir)"""),
    new_code_cell("""\
%matplotlib inline
import matplotlib.pyplot as plt  # inline again: the experiments' own plots switch to Agg
import numpy as np

labels = list(results["policies"])
fig, ax = plt.subplots(figsize=(7, 3.5))
left = np.zeros(len(labels))
for cat in mw.CATEGORIES:
    vals = np.array([100 * results["policies"][p][cat] for p in labels])
    ax.barh(labels, vals, left=left, label=cat.replace("_", " "))
    left += vals
paper = results["paper"]["fig2"]
for i, p in enumerate(labels):
    ax.text(101, i, f"paper: {100 * paper[p]['token_states']:.1f}% token states", va="center",
            fontsize=8)
ax.set_xlim(0, 140)
ax.set_xlabel("share of KV memory in use (%)")
ax.legend(fontsize=7, loc="lower right")
plt.tight_layout()
plt.show()
waste = {p: 1 - s["token_states"] for p, s in results["policies"].items()}
print({p: f"{100 * w:.1f}% wasted" for p, w in waste.items()})"""),
    new_markdown_cell("The experiment's own figure (ours beside the paper's, hatched):"),
    new_code_cell("""\
from IPython.display import Image
Image(filename=os.path.join(out_dir, "memory_waste.png"))"""),
]

BATCHING = [
    new_markdown_cell("""\
# Batch size and latency at the same KV memory (paper Fig. 12-13)

`experiments/batching.py` serves one seeded ShareGPT-like trace (lengths scaled down for the
CPU) with Poisson arrivals through the real engine, once with paged allocation and once under
each Orca reservation policy, all with the same number of KV slots. This notebook plots its
results.json; if there is none it first runs the experiment on a tiny setting (about a minute;
the full run is `python -m experiments.batching --out_dir=results/batching`)."""),
    new_code_cell(SETUP),
    new_code_cell("""\
import json, subprocess

RESULTS = pathlib.Path(os.environ.get("PAGED_JAX_NB_RESULTS", "results/batching/results.json"))
if not RESULTS.exists():
    cmd = [sys.executable, "-m", "experiments.batching", "--num_requests=24", "--rates=2,8",
           "--kv_tokens=512", "--max_num_seqs=16", f"--out_dir={RESULTS.parent}"]
    if MODEL:
        cmd.append(f"--model={MODEL}")
    print(" ".join(cmd))
    subprocess.run(cmd, check=True)
results = json.loads(RESULTS.read_text())
from experiments import batching
print(batching.table(results))"""),
    new_code_cell("""\
%matplotlib inline
import matplotlib.pyplot as plt  # inline again: the experiments' own plots switch to Agg
import numpy as np

pol, paper = results["policies"], results["paper"]["fig13_mean_batched_requests"]
fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
for p, runs in pol.items():
    ax.plot([r["rate"] for r in runs], [r["normalized_latency"] for r in runs], "o-", label=p)
ax.set_xlabel("request rate (req/s)")
ax.set_ylabel("normalized latency (s/token)")
ax.set_title("Fig. 12: latency against rate")
ax.legend()
names = list(pol)
x = np.arange(len(names))
bx.bar(x - 0.2, [pol[p][-1]["mean_batched_requests"] for p in names], 0.4, label="ours")
bx.bar(x + 0.2, [paper[p] for p in names], 0.4, label="paper (OPT-13B)", hatch="//", alpha=0.6)
bx.set_xticks(x, names)
bx.set_ylabel("mean batched requests")
bx.set_title(f"Fig. 13 at {results['rates'][-1]:g} req/s")
bx.legend()
plt.tight_layout()
plt.show()
ratio = results["summary"]["batch_ratio_paged_over"]["orca_oracle"][-1]
print(f"paged batches {ratio:.2f}x the requests of Orca (Oracle) "
      f"(paper: {paper['paged'] / paper['orca_oracle']:.2f}x)")"""),
]


def write(name: str, cells) -> None:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    nbformat.write(nb, HERE / name)


def main() -> None:
    write("01_quickstart.ipynb", QUICKSTART)
    write("02_memory_waste.ipynb", MEMORY_WASTE)
    write("03_batching.ipynb", BATCHING)


if __name__ == "__main__":
    main()
