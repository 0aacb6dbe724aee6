"""The paper's figures (Kwon et al., SOSP 2023; ../shared/PAPER.md) that the experiments print
beside their own, in one place."""
from __future__ import annotations

POLICIES = ("orca_max", "orca_pow2", "orca_oracle", "paged")

# Fig. 2 (ShareGPT, OPT-13B, A100): shares of KV memory. The paper files vLLM's 3.7% waste
# under "external fragmentation & other"; memory_waste.py counts the last blocks' empty tails.
FIG2 = {
    "orca_max": {"token_states": .204, "reservation": .133, "internal_fragmentation": .573,
                 "external_fragmentation": .089},
    "orca_pow2": {"token_states": .268, "reservation": .179, "internal_fragmentation": .136,
                  "external_fragmentation": .416},
    "orca_oracle": {"token_states": .382, "reservation": .252, "internal_fragmentation": 0.0,
                    "external_fragmentation": .366},
    "paged": {"token_states": .963, "reservation": 0.0, "internal_fragmentation": 0.0,
              "external_fragmentation": .037},
}

# Fig. 13, OPT-13B, mean batched requests: ShareGPT at 2 req/s, Alpaca at 30 req/s.
BATCH = {
    "sharegpt": {"orca_max": 7.00, "orca_pow2": 9.81, "orca_oracle": 13.62, "paged": 30.42},
    "alpaca": {"orca_max": 7.00, "orca_pow2": 43.24, "orca_oracle": 72.75, "paged": 132.44},
}
BATCH_RATE = {"sharegpt": 2.0, "alpaca": 30.0}  # the arrival rates of those batch sizes

# Fig. 12: at the same latency vLLM sustains 1.7-2.7x the rate of Orca (Oracle) and 2.7-8x
# that of Orca (Max).
RATE_RATIO = {"orca_oracle": (1.7, 2.7), "orca_max": (2.7, 8.0)}

# Fig. 15 (OPT-13B): memory saved by sharing the prompt between parallel samples.
PARALLEL_SAVING = {"alpaca": {2: 0.0609, 4: 0.0853, 6: 0.0979},
                   "sharegpt": "16.2-30.5% over n = 2-6"}
# Fig. 15 (OPT-13B): memory saved by sharing blocks between the beams of beam search.
BEAM_SAVING = {"alpaca": {2: 0.3756, 4: 0.5313, 6: 0.5516}, "sharegpt": "44.3-66.3% over 2-6"}
# Fig. 16 (LLaMA-13B): throughput with a shared few-shot prefix over no sharing, by prefix
# length (80 tokens: 1-shot, 341 tokens: 5-shot).
PREFIX_SPEEDUP = {"80": 1.67, "341": 3.58}

# Fig. 19 (OPT-13B, ShareGPT): preemption by swap pays many small transfers when blocks are
# small, and recompute costs the same at every block size; the two are comparable from 16 to
# 64 tokens a block. The paper gives the figure as curves, not numbers.
PREEMPTION = ("swap slow for small blocks (one transfer per block); recompute flat; "
              "comparable for blocks of 16-64")
