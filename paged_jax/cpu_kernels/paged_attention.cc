// Paged attention for the CPU, called from JAX through the XLA FFI: ragged batches in which
// each sequence brings any number of new query tokens (a prefill, a chunk of one, a decode).
//
// Why: XLA's CPU gather copies pages at ~7 GB/s on one thread, so the XLA decode path spent
// most of a decode step gathering K and V, and the tiled XLA prefill a fifth of a prefill
// step in its loop. This kernel reads each page where it lies, once per query token for the
// whole query group of a KV head, and spreads (sequence, KV head, query chunk) items over
// XLA's intra-op thread pool. It is the CPU's counterpart of the Pallas kernels; the XLA paths
// in paged_jax/attention.py stay the reference it is tested against.
//
// Shapes (float32, row-major):
//   q               [T, Hq, D]      the step's new tokens, sequences concatenated
//   k_cache         [Hkv, N, B, D]  the pool's pages (docs/ARCHITECTURE.md), new K/V written
//   v_cache         [Hkv, N, B, D]
//   query_start_loc [S + 1] int32   sequence s owns tokens [qsl[s], qsl[s + 1])
//   seq_lens        [S] int32       context length including the new tokens; 0: padding
//   block_tables    [S, MB] int32   logical block -> physical page
//   out             [T, Hq, D]      zeros for padding tokens and sequences of length 0
// Token i of sequence s (of qlen new tokens) sits at position seq_len - qlen + i and attends
// causally to positions up to it (the last `window` of them when window > 0).
// Attributes: scale (float32), window (int64), softcap (float32; > 0: scores become
// softcap * tanh(score / softcap), Gemma 2's attention soft-capping).
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

constexpr int64_t kQueryChunk = 32;  // query tokens per work item: long prompts split up
constexpr int64_t kMaxGroup = 64;    // query heads per KV head

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* seq_lens;
  const int32_t* query_start;
  const int32_t* tables;
  float* out;
  int64_t hq, hkv, num_pages, block, dim, max_blocks;
  float scale;
  int64_t window;
  float softcap;
};

struct Item {
  int64_t seq, head, first, last;  // query tokens [first, last) of `seq` for KV head `head`
};

// One query token, one KV head: scores of the group's G query heads over positions
// [lo, end), a softmax, then the weighted sum of V. Two passes over the pages; scores live in
// `scratch`. kDim > 0 fixes the head size at compile time (unrolled, vectorized).
template <int64_t kDim>
void attend_token(const Problem& p, int64_t s, int64_t h, int64_t token, int64_t end,
                  std::vector<float>& scratch) {
  const int64_t d = kDim > 0 ? kDim : p.dim, g_size = p.hq / p.hkv;
  float* __restrict__ out = p.out + (token * p.hq + h * g_size) * d;
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, end - p.window) : 0;
  const int64_t n = end - lo;
  scratch.resize(static_cast<size_t>(g_size * n));
  float* __restrict__ scores = scratch.data();
  const float* __restrict__ q = p.q + (token * p.hq + h * g_size) * d;
  const int32_t* table = p.tables + s * p.max_blocks;
  const int64_t head_base = h * p.num_pages;

  // Pass 1: scores[g][t - lo] = scale * q_g . k_t, page by page.
  for (int64_t t = lo; t < end;) {
    const int64_t off = t % p.block, stop = std::min(end, t - off + p.block);
    const float* __restrict__ kp = p.k + ((head_base + table[t / p.block]) * p.block + off) * d;
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
  if (p.softcap > 0.f) {
    const float inv_cap = 1.f / p.softcap;
    for (int64_t i = 0; i < g_size * n; ++i)
      scores[i] = p.softcap * std::tanh(scores[i] * inv_cap);
  }
  // Softmax per query head (max-subtracted, in float32 as the XLA path).
  float inv_total[kMaxGroup];
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
  for (int64_t t = lo; t < end;) {
    const int64_t off = t % p.block, stop = std::min(end, t - off + p.block);
    const float* __restrict__ vp = p.v + ((head_base + table[t / p.block]) * p.block + off) * d;
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

template <int64_t kDim>
void attend(const Problem& p, const Item& it, std::vector<float>& scratch) {
  const int64_t len = p.seq_lens[it.seq], g_size = p.hq / p.hkv, d = p.dim;
  const int64_t first_pos = len - (p.query_start[it.seq + 1] - p.query_start[it.seq]);
  for (int64_t token = it.first; token < it.last; ++token) {
    if (len == 0) {  // a padded sequence that still owns tokens: zeros
      std::memset(p.out + (token * p.hq + it.head * g_size) * d, 0, sizeof(float) * g_size * d);
      continue;
    }
    const int64_t end = first_pos + (token - p.query_start[it.seq]) + 1;
    attend_token<kDim>(p, it.seq, it.head, token, end, scratch);
  }
}

// Items are claimed from a shared counter by the calling thread and by helpers scheduled on
// XLA's pool; the call returns when every item is done. A helper that starts late finds no
// item left and only touches the shared counters, which it co-owns.
struct Shared {
  Problem problem;
  std::vector<Item> items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void drain(Shared& w) {
  std::vector<float> scratch;
  const int64_t count = static_cast<int64_t>(w.items.size());
  for (int64_t i; (i = w.next.fetch_add(1)) < count;) {
    switch (w.problem.dim) {
      case 64: attend<64>(w.problem, w.items[i], scratch); break;
      case 128: attend<128>(w.problem, w.items[i], scratch); break;
      default: attend<0>(w.problem, w.items[i], scratch);
    }
    w.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::F32> k_cache, ffi::Buffer<ffi::F32> v_cache,
                              ffi::Buffer<ffi::S32> query_start_loc,
                              ffi::Buffer<ffi::S32> seq_lens,
                              ffi::Buffer<ffi::S32> block_tables,
                              ffi::ResultBuffer<ffi::F32> out, float scale, int64_t window,
                              float softcap) {
  auto qd = q.dimensions(), kd = k_cache.dimensions(), td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged_attention: q must be 3-D, caches 4-D, tables 2-D");
  if (kd[0] < 1 || qd[2] != kd[3] || qd[1] % kd[0] != 0 || qd[1] / kd[0] > kMaxGroup)
    return ffi::Error::InvalidArgument("paged_attention: heads or head size do not fit the cache");
  const int64_t num_tokens = qd[0], num_seqs = td[0], hkv = kd[0];
  if (query_start_loc.dimensions()[0] != num_seqs + 1 || seq_lens.dimensions()[0] != num_seqs)
    return ffi::Error::InvalidArgument("paged_attention: query_start_loc must be [S + 1] and "
                                       "seq_lens [S] for S table rows");
  const int32_t* lens = seq_lens.typed_data();
  const int32_t* qsl = query_start_loc.typed_data();
  const int32_t* tables = block_tables.typed_data();
  // Anything that would read or write outside the arrays is refused instead.
  if (qsl[0] != 0 || qsl[num_seqs] > num_tokens)
    return ffi::Error::InvalidArgument("paged_attention: query_start_loc is outside [0, T]");
  auto shared = std::make_shared<Shared>();
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t qlen = qsl[s + 1] - qsl[s];
    if (qlen < 0)
      return ffi::Error::InvalidArgument("paged_attention: query_start_loc decreases");
    if (lens[s] < 0 || lens[s] > td[1] * kd[2])
      return ffi::Error::InvalidArgument("paged_attention: a sequence length exceeds its table");
    if (lens[s] > 0 && qlen > lens[s])
      return ffi::Error::InvalidArgument("paged_attention: more new tokens than context");
    for (int64_t b = 0; b * kd[2] < lens[s]; ++b)
      if (tables[s * td[1] + b] < 0 || tables[s * td[1] + b] >= kd[1])
        return ffi::Error::InvalidArgument("paged_attention: a block table entry is out of range");
    for (int64_t first = qsl[s]; first < qsl[s + 1]; first += kQueryChunk)
      for (int64_t h = 0; h < hkv; ++h)
        shared->items.push_back(Item{s, h, first, std::min<int64_t>(first + kQueryChunk,
                                                                     qsl[s + 1])});
  }
  float* result = out->typed_data();
  const int64_t row = qd[1] * qd[2];
  std::memset(result + qsl[num_seqs] * row, 0,
              sizeof(float) * (num_tokens - qsl[num_seqs]) * row);  // padding tokens
  shared->problem = Problem{q.typed_data(), k_cache.typed_data(), v_cache.typed_data(), lens,
                            qsl, tables, result, qd[1], hkv, kd[1], kd[2], kd[3], td[1],
                            scale, window, softcap};
  const int64_t count = static_cast<int64_t>(shared->items.size());
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { drain(*shared); });
  drain(*shared);
  while (shared->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionF32, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // query_start_loc
                                  .Arg<ffi::Buffer<ffi::S32>>()   // seq_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_tables
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap"));
