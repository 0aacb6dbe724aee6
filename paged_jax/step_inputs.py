"""The padded int32/float32 arrays one step hands the device, and the bucket ladders that bound
how many shapes (and so compilations) there are. Plain numpy: built on the host every step."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from paged_jax.intmath import cdiv
from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.request import PLACEHOLDER
from paged_jax.scheduler import ScheduledBatch


def ladder(lo: int, hi: int, fine_from: int | None = None) -> tuple[int, ...]:
    """Powers of two from lo up to hi, always ending exactly at hi; from fine_from on, the
    midpoints too (24, 48, 96, ...), so a batch is padded by at most a third, not double."""
    out, v = [], lo
    while v < hi:
        out.append(v)
        if fine_from is not None and v >= fine_from and v + v // 2 < hi:
            out.append(v + v // 2)
        v *= 2
    return tuple(out) + (hi,)


def pick(buckets: tuple[int, ...], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class Buckets:
    seqs: tuple[int, ...]  # padded sequence counts (decode batch sizes)
    tokens: tuple[int, ...]  # padded token counts of prefill steps
    blocks: tuple[int, ...]  # padded block-table widths
    # Precompile "mixed" variants too: prompt steps over a cached prefix (prefix caching) or
    # an earlier chunk (chunked prefill) on the XLA path, whose prefill attention reads only
    # the step's own tokens.
    mixed_steps: bool = False
    # Padded counts of sampled rows for steps with speculative drafts (a row per draft and
    # one more per drafting request); empty without speculative decoding.
    spec_rows: tuple[int, ...] = ()

    @classmethod
    def make(cls, max_num_seqs, max_num_batched_tokens, max_model_len, block_size,
             table_ladder: bool = True, mixed_steps: bool = False,
             num_speculative_tokens: int = 0):
        """table_ladder=False: every step takes the full table width. For the XLA decode
        path, whose loop stops at the batch's longest sequence, a wider table costs nothing,
        and one width means a third as many compiled variants."""
        max_blocks = cdiv(max_model_len, block_size)
        # Batches of one are padded to two: XLA's CPU code for a leading dimension of 1 (matrix
        # times vector) ran a decode step 10x slower than for two rows here. Decode batches
        # cost in proportion to their padded rows, hence the midpoints from 16 rows on.
        return cls(seqs=ladder(min(2, max_num_seqs), max_num_seqs, fine_from=16),
                   tokens=ladder(min(16, max_num_batched_tokens), max_num_batched_tokens),
                   blocks=(ladder(min(8, max_blocks), max_blocks) if table_ladder
                           else (max_blocks,)),
                   mixed_steps=mixed_steps,
                   spec_rows=(ladder(4, max_num_seqs * (num_speculative_tokens + 1))
                              if num_speculative_tokens else ()))

    @property
    def max_rows(self) -> int:
        """The most sampled rows any step has: the length of the device-side token vector a
        step hands the next (ModelRunner)."""
        return max(self.seqs[-1], self.spec_rows[-1] if self.spec_rows else 0)

    def rows_bucket(self, rows: int, s_pad: int, t_pad: int) -> int:
        """Padded sampled rows: one a sequence (S), or with drafts a spec_rows bucket, at
        most T (a row is a token). Past the spec_rows ladder (prompt logprobs score a row
        per prompt token): T, in a variant compiled when first used."""
        if rows <= s_pad:
            return s_pad
        return min([b for b in self.spec_rows if b >= rows] + [t_pad])

    def all_shapes(self):
        """Every (mode, T, S, MB, R) the runner can see: precompile iterates over this."""
        for t in self.tokens:
            s = pick(self.seqs, min(t, self.seqs[-1]))
            for mb in self.blocks:
                yield ("prefill", t, s, mb, s)
                if self.mixed_steps:
                    yield ("mixed", t, s, mb, s)
                # Drafts ride in mixed steps (rows_bucket's picks).
                for r in sorted({min(r, t) for r in self.spec_rows if min(r, t) > s}):
                    yield ("mixed", t, s, mb, r)
        for s in self.seqs:
            for mb in self.blocks:
                yield ("decode", s, s, mb, s)


@dataclasses.dataclass(frozen=True)
class StepInputs:
    mode: str
    input_ids: np.ndarray  # [T]
    # [T]: for a pending token's position (its input id PLACEHOLDER), the row of the previous
    # step's sampled tokens that holds it; -1 elsewhere (asynchronous scheduling)
    prev_rows: np.ndarray
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    query_start_loc: np.ndarray  # [S + 1]
    seq_lens: np.ndarray  # [S]
    block_tables: np.ndarray  # [S, MB]
    logits_indices: np.ndarray  # [R]: the tokens sampled at (one a sequence, or its drafts')
    num_decodes: np.ndarray  # int32 scalar: leading rows of a prefill step that are decodes
    num_seqs: int  # real sequences; rows past it are padding
    drafts: tuple[tuple[int, ...], ...]  # per sequence, the speculative tokens it computes
    # Rows that score a prompt token (prompt logprobs): (sequence index, the position its
    # logits are taken at, the prompt token after it, the row). A chunk that does not sample
    # scores its last position in its own row; other positions get rows after the sampled.
    scores: tuple[tuple[int, int, int, int], ...] = ()

    @property
    def num_rows(self) -> int:
        """Real sampled rows (a sequence's last token and its drafts); the rest is padding."""
        return self.num_seqs + sum(map(len, self.drafts))

    @property
    def num_score_rows(self) -> int:
        """Rows after the sampled ones that score prompt tokens."""
        return sum(1 for *_, row in self.scores if row >= self.num_rows)

    @property
    def shape_key(self) -> tuple:
        return (self.mode, len(self.input_ids), len(self.seq_lens), self.block_tables.shape[1],
                len(self.logits_indices))


def build(batch: ScheduledBatch, kv: KVCacheManager, buckets: Buckets,
          prev_rows: dict[str, int] | None = None) -> StepInputs:
    """prev_rows: request id -> the row of the step still in flight that samples its pending
    token (with asynchronous scheduling; the device fills those input ids in)."""
    if batch.kind == "decode":
        return build_decode(batch, kv, buckets, prev_rows)
    return build_rows(batch, kv, buckets, prev_rows)


def build_decode(batch: ScheduledBatch, kv: KVCacheManager, buckets: Buckets,
                 prev_rows: dict[str, int] | None = None) -> StepInputs:
    """A decode step's inputs (every row one token, its last, sampled), with the per-token
    arithmetic in numpy: most steps are decode steps, and at hundreds of rows the general
    loop (build_rows, which gives the same arrays) was most of their build time."""
    reqs, n = batch.requests, len(batch.requests)
    s_pad = pick(buckets.seqs, n)
    block_tables = table_array([kv.block_table(r.request_id) for r in reqs], s_pad, buckets)
    prev_index = np.full((s_pad,), -1, np.int32)
    ids = []
    for i, r in enumerate(reqs):  # the token at its last position: known, or pending
        if r.num_pending:
            ids.append(PLACEHOLDER)
            prev_index[i] = prev_rows[r.request_id]
        else:
            ids.append(r.output_token_ids[-1] if r.output_token_ids else r.prompt_token_ids[-1])
    positions = np.zeros((s_pad,), np.int32)
    positions[:n] = [r.num_computed_tokens for r in reqs]
    b = kv.block_size
    slots = np.zeros((s_pad,), np.int32)  # (padding tokens write into block 0)
    slots[:n] = block_tables[np.arange(n), positions[:n] // b] * b + positions[:n] % b
    seq_lens = np.zeros((s_pad,), np.int32)
    seq_lens[:n] = positions[:n] + 1
    return StepInputs(
        mode="decode", input_ids=pad(ids, s_pad), prev_rows=prev_index, positions=positions,
        slot_mapping=slots,
        query_start_loc=np.minimum(np.arange(s_pad + 1, dtype=np.int32), n),
        seq_lens=seq_lens, block_tables=block_tables,
        logits_indices=pad(range(n), buckets.rows_bucket(n, s_pad, s_pad)),
        num_decodes=np.asarray(0, np.int32), num_seqs=n, drafts=((),) * n)


def build_rows(batch: ScheduledBatch, kv: KVCacheManager, buckets: Buckets,
               prev_rows: dict[str, int] | None = None) -> StepInputs:
    """Any step's inputs, row by row."""
    reqs, n = batch.requests, len(batch.requests)
    if batch.kind == "decode":
        s_pad = t_pad = pick(buckets.seqs, n)
    else:
        t_pad = pick(buckets.tokens, batch.num_tokens)
        s_pad = pick(buckets.seqs, min(t_pad, buckets.seqs[-1]))
    ids, pos, slots, qsl, lens, drafts, sampled = [], [], [], [0], [], [], []
    prev = []  # (index into ids, row of the previous step)
    scores, extra = [], []  # prompt logprobs' (sequence, position, target, row); and the
    # token indices of the rows after the sampled ones
    for i, (req, new, spec) in enumerate(zip(reqs, batch.num_new_tokens, batch.drafts)):
        # From the first token whose K/V are not cached: a decode's last token, a prompt's
        # first uncached one, or where a chunked prefill left off; then its drafts, if any.
        start = req.num_computed_tokens
        end = start + new
        if req.num_pending:  # its last token is still on the device: the previous step's
            prev.append((len(ids) + req.num_tokens - 1 - start, prev_rows[req.request_id]))
        ids.extend(req.tokens_between(start, end - len(spec)))
        ids.extend(spec)
        pos.extend(range(start, end))
        slots.extend(kv.slots(req.request_id, start, end))
        # Sampled at its last token, or with drafts at the last token and every draft.
        sampled.extend(range(qsl[-1] + new - 1 - len(spec), qsl[-1] + new))
        for p in req.prompt_scores(start, end):
            # The chunk's last position has a sampled row already, which a chunk short of the
            # prompt's end drops: it scores there. (Rows after the sampled are numbered below.)
            row = len(sampled) - 1 if p == end - 1 else -1 - len(extra)
            if row < 0:
                extra.append(qsl[-1] + p - start)
            scores.append((i, p, req.prompt_token_ids[p + 1], row))
        qsl.append(qsl[-1] + new)
        lens.append(end)
        drafts.append(spec)
    tables = table_array([kv.block_table(r.request_id) for r in reqs], s_pad, buckets)
    # A prompt row over a cached prefix (or an earlier chunk) attends over pages it did not
    # write this step.
    prefix = batch.kind == "prefill" and any(
        req.num_computed_tokens > 0 for req in reqs[batch.num_decodes:])
    scores = [(i, p, t, row if row >= 0 else len(sampled) - 1 - row)
              for i, p, t, row in scores]
    prev_index = np.full((t_pad,), -1, np.int32)
    for i, row in prev:
        prev_index[i] = row
    if ids.count(PLACEHOLDER) != len(prev):
        raise AssertionError("a pending token's input id has no row of the step before")
    return StepInputs(
        mode="mixed" if prefix else batch.kind,
        input_ids=pad(ids, t_pad),
        prev_rows=prev_index,
        positions=pad(pos, t_pad),
        # Padding tokens write into block 0, which no request owns.
        slot_mapping=pad(slots, t_pad),
        query_start_loc=pad(qsl, s_pad + 1, qsl[-1]),
        seq_lens=pad(lens, s_pad),
        block_tables=tables,
        logits_indices=pad(sampled + extra,
                            buckets.rows_bucket(len(sampled) + len(extra), s_pad, t_pad)),
        num_decodes=np.asarray(batch.num_decodes if batch.kind == "prefill" else 0, np.int32),
        num_seqs=n, drafts=tuple(drafts), scores=tuple(scores))


def table_array(tables: list[list[int]], num_rows: int, buckets: Buckets) -> np.ndarray:
    """The block tables as [num_rows, a blocks bucket] int32, zero padded: filled through one
    mask rather than row by row (at hundreds of rows, half the time)."""
    lens = np.fromiter(map(len, tables), np.int32, len(tables))
    out = np.zeros((num_rows, pick(buckets.blocks, int(lens.max()))), np.int32)
    out[:len(tables)][np.arange(out.shape[1]) < lens[:, None]] = list(
        itertools.chain.from_iterable(tables))
    return out


def pad(values, size: int, fill: int = 0) -> np.ndarray:
    """An int32 array of `size`: the values, then `fill`."""
    out = np.full((size,), fill, np.int32)
    out[:len(values)] = values
    return out
