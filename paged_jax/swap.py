"""Host (CPU) memory for KV blocks of requests preempted by swap, and the copies between it and
the device's pages.

The host store is one numpy array [L, 2, Hkv, Nh, B, D] (layer, K/V, KV head, host block,
slot, head dim); host block 0 is reserved, as the device's block 0, as the target of padded
copies. A step's copies are batched: one jitted gather of all its swapped-out pages and one
device-to-host transfer, one host-to-device transfer and one jitted scatter (donating the
caches) of all its swapped-in pages: one transfer per direction and step, however many
blocks, where the paper's vLLM issued one cudaMemcpyAsync per block, which made its small
blocks swap slowly (Fig. 19). experiments/preemption.py times both ways.

The block counts are padded to powers of two (a compiled copy per bucket); padded entries
read and write block 0 on both sides.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from paged_jax.intmath import next_pow2
from paged_jax.kv_quant import set_rows


def _bucket(n: int, limit: int) -> int:
    return min(next_pow2(n), limit)


def _gather(caches, ids):
    """[L, 2, Hkv, n, B, D]: the pages `ids` of every layer's K and V."""
    return jnp.stack([jnp.stack([k[:, ids], v[:, ids]]) for k, v in caches])


def _scatter(caches, ids, pages):
    """caches with pages [L, 2, Hkv, n, B, D] written into blocks `ids`."""
    return [(set_rows(k, (slice(None), ids), pages[i, 0].astype(k.dtype)),
             set_rows(v, (slice(None), ids), pages[i, 1].astype(v.dtype)))
            for i, (k, v) in enumerate(caches)]


class SwapSpace:
    def __init__(self, num_cpu_blocks: int, caches):
        """caches: the device KV caches, [(k, v)] per layer, each [Hkv, N, B, D], whose
        shapes, dtype and shardings the copies follow."""
        hkv, num_blocks, b, d = caches[0][0].shape
        self.num_device_blocks = num_blocks
        self.num_host_blocks = num_cpu_blocks + 1
        # np.zeros takes untouched pages from the OS: the store costs memory as it fills.
        self.host = np.zeros((len(caches), 2, hkv, self.num_host_blocks, b, d),
                             jnp.dtype(caches[0][0].dtype))
        cache_sharding = caches[0][0].sharding
        # Pages travel split as the caches are (on the KV heads under tensor parallelism).
        pages_sharding = (NamedSharding(cache_sharding.mesh, P(None, None, *cache_sharding.spec))
                          if isinstance(cache_sharding, NamedSharding) else cache_sharding)
        shardings = jax.tree.map(lambda x: x.sharding, caches)
        self._gather_jit = jax.jit(_gather, out_shardings=pages_sharding)
        self._scatter_jit = jax.jit(_scatter, donate_argnums=(0,), out_shardings=shardings,
                                    in_shardings=(shardings, None, pages_sharding))
        self._compiled: dict[tuple[str, int], object] = {}
        self.num_blocks_out = 0  # blocks copied to the host, and back, so far
        self.num_blocks_in = 0

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def _executable(self, kind: str, n: int, caches):
        key = (kind, n)
        if key not in self._compiled:
            ids = jax.ShapeDtypeStruct((n,), jnp.int32)
            if kind == "gather":
                lowered = self._gather_jit.lower(caches, ids)
            else:
                pages = jax.ShapeDtypeStruct(self.host.shape[:3] + (n,) + self.host.shape[4:],
                                             self.host.dtype)
                lowered = self._scatter_jit.lower(caches, ids, pages)
            self._compiled[key] = lowered.compile()
        return self._compiled[key]

    def apply(self, caches, swap_out, swap_in):
        """Make one step's copies and return the new caches: (device, host) pairs out, then
        (host, device) pairs in. Every read comes before every write, so a block freed by one
        direction may be the other's destination in the same step."""
        out_pages = in_pages = None
        if swap_out:
            dev, _ = self._padded(swap_out)
            out_pages = np.asarray(self._executable("gather", len(dev), caches)(caches, dev))
        if swap_in:
            host, dev_in = self._padded(swap_in)
            in_pages = self.host[:, :, :, host]  # a copy: fancy indexing
        if swap_out:
            n = len(swap_out)
            self.host[:, :, :, [h for _, h in swap_out]] = out_pages[:, :, :, :n]
            self.num_blocks_out += n
        if swap_in:
            caches = self._executable("scatter", len(dev_in), caches)(caches, dev_in, in_pages)
            self.num_blocks_in += len(swap_in)
        return caches

    def precompile(self, caches) -> None:
        """Compile every bucket of both copies, so that swapping never compiles mid-serving."""
        n = 1
        while True:
            self._executable("gather", n, caches)
            self._executable("scatter", n, caches)
            if n >= self.num_device_blocks:
                return
            n = _bucket(n + 1, self.num_device_blocks)

    def _padded(self, pairs):
        """The pairs' two columns as int32 arrays, padded with block 0 to the bucket size."""
        n = _bucket(len(pairs), self.num_device_blocks)
        a = np.zeros(n, np.int32)
        b = np.zeros(n, np.int32)
        a[:len(pairs)] = [p[0] for p in pairs]
        b[:len(pairs)] = [p[1] for p in pairs]
        return a, b
