"""Seeded synthetic workloads shared by the experiments: log-normal lengths, random token ids."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class WorkItem:
    prompt_token_ids: list[int]
    output_len: int


def lognormal_lengths(rng, mean: float, sigma: float, n: int, lo: int, hi: int) -> np.ndarray:
    """Log-normal draws whose (unclipped) mean is `mean`."""
    mu = np.log(mean) - sigma ** 2 / 2
    return np.clip(np.round(rng.lognormal(mu, sigma, n)), lo, hi).astype(int)


def synthetic(n: int, mean_in: float, mean_out: float, seed: int, vocab: int,
              sigma: float = 0.5, max_len: int = 512) -> list[WorkItem]:
    rng = np.random.default_rng(seed)
    ins = lognormal_lengths(rng, mean_in, sigma, n, 4, max_len // 2)
    outs = lognormal_lengths(rng, mean_out, sigma, n, 4, max_len // 2)
    # Token ids away from the special tokens at the bottom of the vocabulary.
    return [WorkItem(rng.integers(100, vocab, int(i)).tolist(), int(o)) for i, o in zip(ins, outs)]
