"""Hashes that name a full KV block by its tokens and everything before them (automatic
prefix caching), as vLLM's block hashes do. Plain Python.

The hash chains through the parent block's hash, so equal hashes mean equal token prefixes,
not only equal blocks. SHA-256 rather than Python's hash(): a collision would silently hand a
request another prompt's K/V.
"""
from __future__ import annotations

import array
import dataclasses
import hashlib
from typing import Sequence


def hash_block(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    h = hashlib.sha256(parent or b"")
    h.update(array.array("q", tokens).tobytes())
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, start: list[bytes] | None = None,
                 limit: int | None = None) -> list[bytes]:
    """Hashes of the full blocks of token_ids (at most `limit` of them), extending `start`
    (the hashes of its first len(start) blocks, already known)."""
    out = list(start or [])
    n = len(token_ids) // block_size if limit is None else min(limit, len(token_ids) // block_size)
    for i in range(len(out), n):
        out.append(hash_block(out[-1] if out else None,
                              token_ids[i * block_size:(i + 1) * block_size]))
    return out


@dataclasses.dataclass(frozen=True)
class PrefixHit:
    """The cached blocks a new request can start from, and their hashes."""
    blocks: tuple[int, ...] = ()
    hashes: tuple[bytes, ...] = ()
    block_size: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size
