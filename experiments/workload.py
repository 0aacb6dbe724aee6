"""Seeded synthetic workloads shared by the experiments: log-normal lengths, random token ids,
and the paper's ShareGPT / Alpaca length traces (draw_trace)."""
from __future__ import annotations

import dataclasses
import functools
import math

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


# ---- the paper's traces (Fig. 11) -----------------------------------------------------------

# (mean prompt, mean output, log-normal sigma of both). The means are the paper's (Fig. 11);
# sigma = 1.0 gives ShareGPT's long tail (std about 1.3x the mean), Alpaca's lengths are
# tighter (0.8). The log-normal's mu is solved so that the means hold *after* filtering.
DATASETS = {"sharegpt": (161.31, 337.99, 1.0), "alpaca": (19.31, 58.45, 0.8)}
MIN_LEN = 4  # vLLM's ShareGPT filter drops prompts or outputs shorter than this


def _keep(p: np.ndarray, o: np.ndarray, max_model_len: int) -> np.ndarray:
    """vLLM's ShareGPT filter (prompt <= 1024, total <= 2048), scaled to max_model_len."""
    return (p >= MIN_LEN) & (o >= MIN_LEN) & (p <= max_model_len // 2) & (p + o <= max_model_len)


def _lengths(z: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return np.maximum(1, np.round(np.exp(mu + sigma * z))).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _solve_mus(dataset: str, max_model_len: int) -> tuple[float, float]:
    """mu of each log-normal such that the filtered means are the paper's (fixed-point)."""
    mean_p, mean_o, sigma = DATASETS[dataset]
    z = np.random.default_rng(12345).standard_normal((2, 100_000))
    mu_p, mu_o = math.log(mean_p) - sigma**2 / 2, math.log(mean_o) - sigma**2 / 2
    for _ in range(10):  # converges to 4 digits in about 6
        p, o = _lengths(z[0], mu_p, sigma), _lengths(z[1], mu_o, sigma)
        keep = _keep(p, o, max_model_len)
        mu_p += math.log(mean_p / p[keep].mean())
        mu_o += math.log(mean_o / o[keep].mean())
    return mu_p, mu_o


def draw_trace(dataset: str, num_requests: int, seed: int,
               max_model_len: int = 2048) -> list[tuple[int, int]]:
    """(prompt length, output length) pairs, seeded, drawn until num_requests pass the filter."""
    mu_p, mu_o = _solve_mus(dataset, max_model_len)
    sigma = DATASETS[dataset][2]
    rng = np.random.default_rng(seed)
    out: list[tuple[int, int]] = []
    while len(out) < num_requests:
        p = _lengths(rng.standard_normal(num_requests), mu_p, sigma)
        o = _lengths(rng.standard_normal(num_requests), mu_o, sigma)
        keep = _keep(p, o, max_model_len)
        out.extend(zip(p[keep].tolist(), o[keep].tolist()))
    return out[:num_requests]
