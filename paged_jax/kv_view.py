"""The block pool as data: who holds each KV block, which blocks are shared or cached, the
host swap pool, the queues with each request's block table, and the waste figures. What the
server's /v1/kv_cache returns, its /dashboard draws, and `plot_kv_pool` draws in a notebook.
No JAX here: it reads the engine's snapshot and its block pools, on the engine's thread.

Per device block, `owner` holds the index (into `requests`) of the request whose table holds
it, -1 if it is free, and -2 if several requests hold it (a shared prefix, n > 1 samples);
`cached` lists the blocks registered in the prefix cache (free ones keep their K/V until
evicted); `refs` lists [block, owners] for the shared ones.
"""
from __future__ import annotations

from typing import Any

FREE, SHARED = -1, -2


def kv_view(engine) -> dict[str, Any]:
    snap = engine.snapshot(with_requests=True)
    pool, cpu = engine.kv.pool, engine.kv.cpu_pool
    requests = []
    for r in snap.requests:
        host = list(engine.kv.host_blocks(r.request_id)) if r.status == "swapped" else []
        requests.append(dict(id=r.request_id, status=r.status, prompt_tokens=r.num_prompt_tokens,
                             tokens=r.num_tokens, computed=r.num_computed_tokens,
                             blocks=list(r.block_table), host_blocks=host,
                             preemptions=r.num_preemptions))
    owner = _owners([r["blocks"] for r in requests], pool.num_blocks)
    host_owner = (_owners([r["host_blocks"] for r in requests], cpu.num_blocks)
                  if cpu is not None else [])
    refs = pool.ref_counts()
    kv = snap.kv
    return dict(
        block_size=snap.block_size,
        num_blocks=pool.num_blocks,  # block 0 included (reserved: padding)
        owner=owner,
        refs=[[b, n] for b, n in enumerate(refs) if n > 1],
        cached=sorted(pool.cached_ids()),
        host_owner=host_owner,
        requests=requests,
        queues=dict(running=snap.num_running, waiting=snap.num_waiting,
                    swapped=snap.num_swapped),
        usage=dict(kv_usage=kv.usage, token_state_share=kv.token_state_share,
                   internal_fragmentation=kv.internal_fragmentation,
                   # Any free block serves any request: a paged pool has no external
                   # fragmentation (the paper's point), so this is 0 by construction.
                   external_fragmentation=0.0,
                   cpu_usage=snap.cpu_usage),
        totals=dict(steps=snap.num_steps, prompt_tokens=snap.prompt_tokens,
                    generation_tokens=snap.generation_tokens,
                    preemptions=snap.num_preemptions,
                    prefix_cache_hits=snap.prefix_cache_hits,
                    prefix_cache_queries=snap.prefix_cache_queries),
    )


def _owners(tables: list[list[int]], num_blocks: int) -> list[int]:
    """Per block: the index of the one table holding it, FREE, or SHARED. Entry 0 is the
    padding block (or one a sliding window released), held by nobody."""
    owner = [FREE] * num_blocks
    for i, table in enumerate(tables):
        for b in table:
            if b:
                owner[b] = i if owner[b] in (FREE, i) else SHARED
    return owner


def plot_kv_pool(llm_or_engine, columns: int = 64, ax=None):
    """The device block pool as a grid, one cell per block: coloured by the request that
    holds it, black where several share it, light grey where free but cached, white where
    free; block 0 (reserved) hatched. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    engine = getattr(llm_or_engine, "llm_engine", llm_or_engine)
    view = kv_view(engine)
    n = view["num_blocks"]
    rows = -(-n // columns)
    owner = np.full(rows * columns, np.nan)
    owner[:n] = view["owner"]
    cached = np.zeros(rows * columns, bool)
    cached[view["cached"]] = True
    palette = plt.get_cmap("tab20").colors
    num = max(1, len(view["requests"]))
    colors = ["white", "0.85", "black"] + [palette[i % 20] for i in range(num)]
    # codes: 0 free, 1 free and cached, 2 shared, 3 + i request i
    code = np.where(owner == FREE, np.where(cached, 1, 0),
                    np.where(owner == SHARED, 2, owner + 3))
    code = np.where(np.isnan(owner), 0, code)
    fig = ax.figure if ax is not None else plt.figure(figsize=(8, max(1.5, rows * 0.14)))
    ax = ax or fig.add_subplot()
    ax.imshow(code.reshape(rows, columns), cmap=ListedColormap(colors), vmin=0,
              vmax=len(colors) - 1, interpolation="nearest", aspect="equal")
    ax.add_patch(plt.Rectangle((-0.5, -0.5), 1, 1, fill=False, hatch="////"))
    ax.set_xticks([])
    ax.set_yticks([])
    usage = view["usage"]
    ax.set_title(f"{n - 1} KV blocks of {view['block_size']} tokens: {usage['kv_usage']:.0%} "
                 f"used, {len(view['refs'])} shared, {usage['internal_fragmentation']:.1%} "
                 f"of used slots empty; {len(view['requests'])} requests", fontsize=9)
    return fig
