// Decode paged attention for the CPU, called from JAX through the XLA FFI.
//
// Why: XLA's CPU gather copies pages at ~7 GB/s on one thread, so the XLA decode path spends
// most of a decode step gathering K and V. This kernel reads each page where it lies, once per
// KV head (shared by the head's query group), and splits the (sequence, KV head) items over
// XLA's intra-op thread pool. It is the CPU's counterpart of the Pallas decode kernels; the XLA
// path in paged_jax/attention.py stays the reference it is tested against.
//
// Shapes (float32, row-major):
//   q            [S, Hq, D]       one query token per sequence
//   k_cache      [Hkv, N, B, D]   the pool's pages (the layout of docs/ARCHITECTURE.md)
//   v_cache      [Hkv, N, B, D]
//   seq_lens     [S] int32        context length with the new token; 0 marks a padded row
//   block_tables [S, MB] int32    logical block -> physical page
//   out          [S, Hq, D]       zeros for rows with seq_len 0
// Attributes: scale (float32), window (int64, > 0: attend to the last `window` positions).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* seq_lens;
  const int32_t* tables;
  float* out;
  int64_t num_seqs, hq, hkv, num_pages, block, dim, max_blocks;
  float scale;
  int64_t window;
};

// One (sequence, KV head): scores of the group's G query heads over the context, a softmax,
// then the weighted sum of V. Two passes over the pages; scores live in `scratch`. kDim > 0
// fixes the head size at compile time (full unrolling and vectorization); 0 reads p.dim.
template <int64_t kDim>
void attend(const Problem& p, int64_t item, std::vector<float>& scratch) {
  const int64_t d = kDim > 0 ? kDim : p.dim;
  const int64_t s = item / p.hkv, h = item % p.hkv, g_size = p.hq / p.hkv;
  float* __restrict__ out = p.out + (s * p.hq + h * g_size) * d;
  const int64_t len = p.seq_lens[s];
  if (len <= 0) {
    std::memset(out, 0, sizeof(float) * g_size * d);
    return;
  }
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, len - p.window) : 0;
  const int64_t n = len - lo;
  scratch.resize(static_cast<size_t>(g_size * n));
  float* __restrict__ scores = scratch.data();
  const float* __restrict__ q = p.q + (s * p.hq + h * g_size) * d;
  const int32_t* table = p.tables + s * p.max_blocks;
  const int64_t head_base = h * p.num_pages;

  // Pass 1: scores[g][t - lo] = scale * q_g . k_t, page by page.
  for (int64_t t = lo; t < len;) {
    const int64_t page = table[t / p.block], off = t % p.block;
    const int64_t stop = std::min(len, t - off + p.block);
    const float* __restrict__ kp = p.k + ((head_base + page) * p.block + off) * d;
    for (int64_t u = t; u < stop; ++u, kp += d) {
      for (int64_t g = 0; g < g_size; ++g) {
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < d; ++i) acc += q[g * d + i] * kp[i];
        scores[g * n + (u - lo)] = acc * p.scale;
      }
    }
    t = stop;
  }
  // Softmax per query head (max-subtracted, in float32 as the XLA path).
  float inv_total[64];
  for (int64_t g = 0; g < g_size; ++g) {
    float* __restrict__ sc = scores + g * n;
    float peak = sc[0];
    for (int64_t i = 1; i < n; ++i) peak = std::max(peak, sc[i]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; ++i) {
      sc[i] = std::exp(sc[i] - peak);
      total += sc[i];
    }
    inv_total[g] = 1.f / total;
  }
  // Pass 2: out_g = sum_t p[g][t] v_t / total_g.
  std::memset(out, 0, sizeof(float) * g_size * d);
  for (int64_t t = lo; t < len;) {
    const int64_t page = table[t / p.block], off = t % p.block;
    const int64_t stop = std::min(len, t - off + p.block);
    const float* __restrict__ vp = p.v + ((head_base + page) * p.block + off) * d;
    for (int64_t u = t; u < stop; ++u, vp += d) {
      for (int64_t g = 0; g < g_size; ++g) {
        const float w = scores[g * n + (u - lo)];
        float* __restrict__ o = out + g * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) o[i] += w * vp[i];
      }
    }
    t = stop;
  }
  for (int64_t g = 0; g < g_size; ++g)
    for (int64_t i = 0; i < d; ++i) out[g * d + i] *= inv_total[g];
}

// Items are claimed from a shared counter by the calling thread and by helpers scheduled on
// XLA's pool; the call returns when every item is done. A helper that starts late finds no
// item left and only touches the shared counters, which it co-owns.
struct Shared {
  Problem problem;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void drain(Shared& w) {
  std::vector<float> scratch;
  for (int64_t i; (i = w.next.fetch_add(1)) < w.items;) {
    switch (w.problem.dim) {
      case 64: attend<64>(w.problem, i, scratch); break;
      case 128: attend<128>(w.problem, i, scratch); break;
      default: attend<0>(w.problem, i, scratch);
    }
    w.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error PagedDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> k_cache, ffi::Buffer<ffi::F32> v_cache,
                           ffi::Buffer<ffi::S32> seq_lens, ffi::Buffer<ffi::S32> block_tables,
                           ffi::ResultBuffer<ffi::F32> out, float scale, int64_t window) {
  auto qd = q.dimensions(), kd = k_cache.dimensions(), td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged_decode: q must be 3-D, caches 4-D, tables 2-D");
  if (qd[2] != kd[3] || qd[1] % kd[0] != 0 || qd[1] / kd[0] > 64)
    return ffi::Error::InvalidArgument("paged_decode: heads or head size do not fit the cache");
  // A bad length or page index would read outside the pool: refuse it instead.
  const int32_t* lens = seq_lens.typed_data();
  const int32_t* tables = block_tables.typed_data();
  for (int64_t s = 0; s < qd[0]; ++s) {
    if (lens[s] < 0 || lens[s] > td[1] * kd[2])
      return ffi::Error::InvalidArgument("paged_decode: a sequence length exceeds its table");
    for (int64_t b = 0; b * kd[2] < lens[s]; ++b)
      if (tables[s * td[1] + b] < 0 || tables[s * td[1] + b] >= kd[1])
        return ffi::Error::InvalidArgument("paged_decode: a block table entry is out of range");
  }
  auto shared = std::make_shared<Shared>();
  shared->problem = Problem{q.typed_data(), k_cache.typed_data(), v_cache.typed_data(),
                            seq_lens.typed_data(), block_tables.typed_data(),
                            out->typed_data(), qd[0], qd[1], kd[0], kd[1], kd[2], kd[3],
                            td[1], scale, window};
  shared->items = qd[0] * kd[0];
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { drain(*shared); });
  drain(*shared);
  while (shared->done.load(std::memory_order_acquire) < shared->items) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedDecodeF32, PagedDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window"));
