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
// Shapes (row-major):
//   q               [T, Hq, D] f32  the step's new tokens, sequences concatenated
//   k_cache         [Hkv, N, B, D]  the pool's pages (docs/ARCHITECTURE.md), new K/V written:
//   v_cache         [Hkv, N, B, D]  f32, bf16, f16, or fp8 (e4m3fn, e5m2) read as fp8 * k_scale
//                                   (v_scale); or s8 [Hkv, N, B, D + 2], each row D values and
//                                   its float16 scale's bytes (paged_jax/kv_quant.py)
//   query_start_loc [S + 1] int32   sequence s owns tokens [qsl[s], qsl[s + 1])
//   seq_lens        [S] int32       context length including the new tokens; 0: padding
//   block_tables    [S, MB] int32   logical block -> physical page
//   out             [T, Hq, D]      zeros for padding tokens and sequences of length 0
// Token i of sequence s (of qlen new tokens) sits at position seq_len - qlen + i and attends
// causally to positions up to it (the last `window` of them when window > 0).
// Attributes: scale (float32), window (int64), softcap (float32; > 0: scores become
// softcap * tanh(score / softcap), Gemma 2's attention soft-capping), k_scale, v_scale
// (float32; fp8 pages' per-tensor scales, 1 otherwise).
// Pages other than float32 are converted to float32 a page's rows at a time into a small
// buffer, so the dot products and sums stay the float32 path's vector loops.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kQueryChunk = 32;  // query tokens per work item: long prompts split up
constexpr int64_t kMaxGroup = 64;    // query heads per KV head
constexpr int64_t kScaleBytes = 2;   // an int8 row's float16 scale, after its values

enum class Page { kF32, kBF16, kF16, kE4M3, kE5M2, kS8 };

float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint32_t to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// Bit-level conversions, exact without float32 denormals (XLA's threads flush them to zero):
// a subnormal half or fp8 is a small integer times a power of two, a normal float32. Integer
// selects vectorize; a 256-entry fp8 table's gather ran at a quarter of their speed.
float half_to_float(uint16_t h) {
  const uint32_t em = h & 0x7fffu, sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t wide = em >= 0x7c00u ? (em << 13) | 0x7f800000u : (em << 13) + (112u << 23);
  const uint32_t bits = em < 0x400u ? to_bits(float(int32_t(em)) * 0x1p-24f) : wide;
  return from_bits(bits | sign);
}

// e5m2 is the top byte of a binary16: same exponent bias, two of its mantissa bits.
float e5m2_to_float(uint8_t b) { return half_to_float(uint16_t(b << 8)); }

// e4m3fn: exponent bias 7, no infinities, S.1111.111 is NaN.
float e4m3_to_float(uint8_t b) {
  const uint32_t em = b & 0x7fu, sign = uint32_t(b & 0x80u) << 24;
  const uint32_t normal = em == 0x7fu ? 0x7fc00000u : (em << 20) + (120u << 23);
  const uint32_t bits = em < 8u ? to_bits(float(int32_t(em)) * 0x1p-9f) : normal;
  return from_bits(bits | sign);
}

template <Page kPage>
using Stored = std::conditional_t<kPage == Page::kF32, float,
               std::conditional_t<kPage == Page::kBF16 || kPage == Page::kF16, uint16_t,
               std::conditional_t<kPage == Page::kS8, int8_t, uint8_t>>>;

// Rows [row, row + count) of a page array as float32: float32 pages are read where they lie,
// the others converted into buf (count * d floats).
template <Page kPage>
const float* page_rows(const void* pages, int64_t row, int64_t count, int64_t d,
                       float* __restrict__ buf) {
  using T = Stored<kPage>;
  if constexpr (kPage == Page::kF32) {
    return static_cast<const float*>(pages) + row * d;
  } else if constexpr (kPage == Page::kS8) {
    const int64_t stride = d + kScaleBytes;
    const int8_t* src = static_cast<const int8_t*>(pages) + row * stride;
    for (int64_t r = 0; r < count; ++r, src += stride) {
      uint16_t scale_bits;
      std::memcpy(&scale_bits, src + d, sizeof scale_bits);
      const float row_scale = half_to_float(scale_bits);
      float* __restrict__ o = buf + r * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] = float(src[i]) * row_scale;
    }
    return buf;
  } else {
    const T* __restrict__ src = static_cast<const T*>(pages) + row * d;
    const int64_t n = count * d;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (kPage == Page::kBF16) buf[i] = from_bits(uint32_t(src[i]) << 16);
      else if constexpr (kPage == Page::kF16) buf[i] = half_to_float(src[i]);
      else if constexpr (kPage == Page::kE4M3) buf[i] = e4m3_to_float(src[i]);
      else buf[i] = e5m2_to_float(src[i]);
    }
    return buf;
  }
}

struct Problem {
  const float* q;
  const void* k;
  const void* v;
  const int32_t* seq_lens;
  const int32_t* query_start;
  const int32_t* tables;
  float* out;
  int64_t hq, hkv, num_pages, block, dim, max_blocks;
  float scale;
  int64_t window;
  float softcap;
  float v_scale;  // (k_scale is folded into scale: scores are linear in K)
  Page page;
};

struct Item {
  int64_t seq, head, first, last;  // query tokens [first, last) of `seq` for KV head `head`
};

// One query token, one KV head: scores of the group's G query heads over positions
// [lo, end), a softmax, then the weighted sum of V. Two passes over the pages; scores live in
// `scratch`, converted rows in `rows`. kDim > 0 fixes the head size at compile time
// (unrolled, vectorized).
template <int64_t kDim, Page kPage>
void attend_token(const Problem& p, int64_t s, int64_t h, int64_t token, int64_t end,
                  std::vector<float>& scratch, float* rows) {
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
    const float* __restrict__ kp = page_rows<kPage>(
        p.k, (head_base + table[t / p.block]) * p.block + off, stop - t, d, rows);
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
    inv_total[g] = p.v_scale / total;
  }
  // Pass 2: out_g = sum_t p[g][t] v_t / total_g.
  std::memset(out, 0, sizeof(float) * g_size * d);
  for (int64_t t = lo; t < end;) {
    const int64_t off = t % p.block, stop = std::min(end, t - off + p.block);
    const float* __restrict__ vp = page_rows<kPage>(
        p.v, (head_base + table[t / p.block]) * p.block + off, stop - t, d, rows);
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

template <int64_t kDim, Page kPage>
void attend(const Problem& p, const Item& it, std::vector<float>& scratch, float* rows) {
  const int64_t len = p.seq_lens[it.seq], g_size = p.hq / p.hkv, d = p.dim;
  const int64_t first_pos = len - (p.query_start[it.seq + 1] - p.query_start[it.seq]);
  for (int64_t token = it.first; token < it.last; ++token) {
    if (len == 0) {  // a padded sequence that still owns tokens: zeros
      std::memset(p.out + (token * p.hq + it.head * g_size) * d, 0, sizeof(float) * g_size * d);
      continue;
    }
    const int64_t end = first_pos + (token - p.query_start[it.seq]) + 1;
    attend_token<kDim, kPage>(p, it.seq, it.head, token, end, scratch, rows);
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

template <Page kPage>
void attend_page(const Problem& p, const Item& it, std::vector<float>& scratch, float* rows) {
  switch (p.dim) {
    case 64: attend<64, kPage>(p, it, scratch, rows); break;
    case 128: attend<128, kPage>(p, it, scratch, rows); break;
    default: attend<0, kPage>(p, it, scratch, rows);
  }
}

void drain(Shared& w) {
  const Problem& p = w.problem;
  std::vector<float> scratch;
  std::vector<float> rows(p.page == Page::kF32 ? 0 : p.block * p.dim);
  const int64_t count = static_cast<int64_t>(w.items.size());
  for (int64_t i; (i = w.next.fetch_add(1)) < count;) {
    const Item& it = w.items[i];
    switch (p.page) {
      case Page::kF32: attend_page<Page::kF32>(p, it, scratch, rows.data()); break;
      case Page::kBF16: attend_page<Page::kBF16>(p, it, scratch, rows.data()); break;
      case Page::kF16: attend_page<Page::kF16>(p, it, scratch, rows.data()); break;
      case Page::kE4M3: attend_page<Page::kE4M3>(p, it, scratch, rows.data()); break;
      case Page::kE5M2: attend_page<Page::kE5M2>(p, it, scratch, rows.data()); break;
      case Page::kS8: attend_page<Page::kS8>(p, it, scratch, rows.data()); break;
    }
    w.done.fetch_add(1, std::memory_order_release);
  }
}

bool page_kind(ffi::DataType type, Page* page) {
  switch (type) {
    case ffi::DataType::F32: *page = Page::kF32; return true;
    case ffi::DataType::BF16: *page = Page::kBF16; return true;
    case ffi::DataType::F16: *page = Page::kF16; return true;
    case ffi::DataType::F8E4M3FN: *page = Page::kE4M3; return true;
    case ffi::DataType::F8E5M2: *page = Page::kE5M2; return true;
    case ffi::DataType::S8: *page = Page::kS8; return true;
    default: return false;
  }
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                              ffi::Buffer<ffi::S32> query_start_loc,
                              ffi::Buffer<ffi::S32> seq_lens,
                              ffi::Buffer<ffi::S32> block_tables,
                              ffi::ResultBuffer<ffi::F32> out, float scale, int64_t window,
                              float softcap, float k_scale, float v_scale) {
  auto qd = q.dimensions(), kd = k_cache.dimensions(), td = block_tables.dimensions();
  Page page;
  if (k_cache.element_type() != v_cache.element_type() || !page_kind(k_cache.element_type(), &page))
    return ffi::Error::InvalidArgument("paged_attention: K and V pages must be one of f32, bf16, "
                                       "f16, f8e4m3fn, f8e5m2, s8");
  auto vd = v_cache.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 ||
      !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()))
    return ffi::Error::InvalidArgument("paged_attention: q must be 3-D, caches 4-D of one shape, "
                                       "tables 2-D");
  const int64_t row = page == Page::kS8 ? qd[2] + kScaleBytes : qd[2];
  if (kd[0] < 1 || row != kd[3] || qd[1] % kd[0] != 0 || qd[1] / kd[0] > kMaxGroup)
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
  const int64_t token_size = qd[1] * qd[2];
  std::memset(result + qsl[num_seqs] * token_size, 0,
              sizeof(float) * (num_tokens - qsl[num_seqs]) * token_size);  // padding tokens
  shared->problem = Problem{q.typed_data(), k_cache.untyped_data(), v_cache.untyped_data(), lens,
                            qsl, tables, result, qd[1], hkv, kd[1], kd[2], qd[2], td[1],
                            scale * k_scale, window, softcap, v_scale, page};
  const int64_t count = static_cast<int64_t>(shared->items.size());
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { drain(*shared); });
  drain(*shared);
  while (shared->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
  return ffi::Error::Success();
}

// The cache write, in place (the result aliases `cache`): XLA's CPU scatter on 8- and 16-bit
// floats widens the whole cache to float32 and back, a copy of the pool per write, where this
// copies only the new rows. cache [Hkv, N, B, W] and rows [Hkv, T, W] of one dtype (any
// width: rows come quantized), slots [T] int32 in [0, N * B).
ffi::Error WriteRowsImpl(ffi::AnyBuffer cache, ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> slots,
                         ffi::Result<ffi::AnyBuffer> out) {
  const auto cd = cache.dimensions();
  const auto rd = rows.dimensions();
  if (cache.element_type() != rows.element_type() || cd.size() != 4 || rd.size() != 3 ||
      rd[0] != cd[0] || rd[2] != cd[3] || slots.element_count() != static_cast<size_t>(rd[1]))
    return ffi::Error::InvalidArgument("write_rows: rows must be [Hkv, T, W] of the cache's "
                                       "dtype and [Hkv, N, B, W] shape, slots [T]");
  const size_t width = cache.element_count() ? cache.size_bytes() / cache.element_count() : 0;
  const int64_t heads = cd[0], num_slots = cd[1] * cd[2], tokens = rd[1];
  const size_t row = static_cast<size_t>(cd[3]) * width;
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != cache.untyped_data())  // (not aliased: start from the cache's contents)
    std::memcpy(dst, cache.untyped_data(), cache.size_bytes());
  const char* src = static_cast<const char*>(rows.untyped_data());
  const int32_t* slot = slots.typed_data();
  for (int64_t t = 0; t < tokens; ++t)
    if (slot[t] < 0 || slot[t] >= num_slots)
      return ffi::Error::InvalidArgument("write_rows: a slot is outside the cache");
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t t = 0; t < tokens; ++t)
      std::memcpy(dst + (h * num_slots + slot[t]) * row, src + (h * tokens + t) * row, row);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WriteRows, WriteRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // cache
                                  .Arg<ffi::AnyBuffer>()          // rows
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slots
                                  .Ret<ffi::AnyBuffer>());        // the cache, aliased

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::AnyBuffer>()          // k_cache
                                  .Arg<ffi::AnyBuffer>()          // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // query_start_loc
                                  .Arg<ffi::Buffer<ffi::S32>>()   // seq_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_tables
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap")
                                  .Attr<float>("k_scale")
                                  .Attr<float>("v_scale"));
