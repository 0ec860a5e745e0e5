// Paged decode attention for CPUs with AVX512 (lmserve/attention/cpu_decode_kernel.py says why).
//
// One query token per sequence. The cache stays in the engine's layout, [blocks, block_size,
// kv_heads, head_dim]: a work item (sequence, kv head) walks its block table and reads each key and
// value row where it lies (head_dim contiguous values), so nothing is gathered or transposed. The
// query heads sharing the kv head (GQA) are scored against each loaded key together. Softmax is
// online (flash-decoding's running max and sum) in fp32, keys and values widened to fp32 as they
// are loaded; the output is rounded to the input dtype once, at the end.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace {

constexpr int64_t kChunk = 16;     // tokens scored before one online-softmax update (one zmm of scores)
constexpr int64_t kMaxGroup = 16;  // query heads per kv head

// 16 values (those of `mask`; the others read as 0) widened to fp32. Masked loads do not touch
// memory outside the mask: a head size that is not a multiple of 16 reads only its own values.
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 mask) {
  // bf16 is the high half of an fp32: widen exactly by a 16-bit shift.
  const __m256i raw = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p, __mmask16 mask) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p)); }

// exp(x) for x <= 0 (scores minus their running max), to ~1 ulp: x = n ln2 + r, |r| <= ln2 / 2,
// a degree-7 Taylor polynomial of exp(r) (truncation < 1e-8 relative), scaled by 2^n. Inputs below
// -1000 (-inf included) give 0.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-1000.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split: exact high part
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Where token t's row for one kv head starts, in elements from that head's first row.
inline int64_t row_offset(const int64_t* table, int64_t t, int64_t block_size, int64_t row_stride) {
  return (table[t / block_size] * block_size + t % block_size) * row_stride;
}

// Sixteen vectors -> one vector of their sixteen sums, by a tree of 128-bit and 32-bit shuffles
// (45 operations instead of sixteen full horizontal reductions). d[i] must hold token
// kTokenSlot[i]'s partial sums for lane i of the result to hold token i's dot product: the tree
// leaves the tokens 4 x 4 transposed, and the slots undo that.
constexpr int kTokenSlot[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

inline __m512 sum16(const float* d) {  // d: 16 vectors of 16 floats, 64-byte aligned
  __m512 z[8], w[4], u[2];
  for (int i = 0; i < 8; ++i) {
    const __m512 x = _mm512_load_ps(d + 32 * i), y = _mm512_load_ps(d + 32 * i + 16);
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
  for (int i = 0; i < 4; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44), _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
}

// One sequence and H consecutive kv heads (G query heads each, NV * 16 values) against tokens
// [first, len). Per chunk of tokens, every head of the range is done before the next chunk, so the
// cache is read in the order it lies (a token's rows of the H heads are adjacent) and the next
// chunk's rows are prefetched meanwhile. Queries and accumulators live in fp32 buffers (G * NV
// vectors would not fit in registers); a chunk's values are widened once into `vf` and then
// accumulated per query head with that head's accumulator in registers.
template <typename T, int NV>
void attend(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t first, int64_t len,
            int64_t H, int64_t G, int64_t dim, int64_t block_size, int64_t row_stride, float scale, float softcap, T* out) {
  constexpr int64_t D = NV * 16;  // the fp32 buffers' row: dim padded with zeros to whole vectors
  __mmask16 km[NV];  // the lanes of each vector inside dim
  for (int v = 0; v < NV; ++v) {
    const int64_t rest = dim - 16 * v;
    km[v] = rest >= 16 ? static_cast<__mmask16>(0xFFFF) : rest <= 0 ? 0 : static_cast<__mmask16>((1u << rest) - 1);
  }
  const int64_t heads = H * G;
  const int lines = static_cast<int>((H * dim * static_cast<int64_t>(sizeof(T)) + 63) / 64);
  std::vector<float> qbuf(heads * D + 16), abuf(heads * D + 16), m(heads), l(heads);
  // 64-byte aligned views of the buffers (aligned loads and stores below)
  float* qf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(qbuf.data()) + 63) & ~uintptr_t(63));
  float* acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(abuf.data()) + 63) & ~uintptr_t(63));
  alignas(64) float vf[kChunk * D];
  alignas(64) float s[kMaxGroup][kChunk];
  alignas(64) float dots[kMaxGroup][kChunk * 16];  // per query head, each token's 16 partial sums
  const float q_scale = softcap == 0.0f ? scale : 1.0f;  // no softcap: the scale folded into the query
  for (int64_t g = 0; g < heads; ++g) {
    for (int v = 0; v < NV; ++v) {
      _mm512_store_ps(qf + g * D + v * 16, _mm512_mul_ps(load16(q + g * dim + v * 16, km[v]), _mm512_set1_ps(q_scale)));
      _mm512_store_ps(acc + g * D + v * 16, _mm512_setzero_ps());
    }
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.0f;
  }
  auto prefetch = [&](int64_t t0) {
    for (int64_t t = t0; t < std::min(t0 + kChunk, len); ++t) {
      const int64_t offset = row_offset(table, t, block_size, row_stride);
      for (int c = 0; c < lines; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(k_cache + offset) + 64 * c, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(v_cache + offset) + 64 * c, _MM_HINT_T0);
      }
    }
  };
  prefetch(first);
  for (int64_t t0 = first; t0 < len; t0 += kChunk) {
    const int64_t n = std::min(kChunk, len - t0);
    int64_t offset[kChunk];
    for (int64_t j = 0; j < n; ++j) offset[j] = row_offset(table, t0 + j, block_size, row_stride);
    prefetch(t0 + kChunk);
    const __mmask16 valid = n == kChunk ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
    for (int64_t h = 0; h < H; ++h) {
      const T* kh = k_cache + h * dim;
      const T* vh = v_cache + h * dim;
      for (int64_t j = 0; j < n; ++j) {
        __m512 kv[NV];
        for (int v = 0; v < NV; ++v) kv[v] = load16(kh + offset[j] + v * 16, km[v]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf + (h * G + g) * D;
          __m512 dot = _mm512_mul_ps(_mm512_load_ps(qg), kv[0]);
          for (int v = 1; v < NV; ++v) dot = _mm512_fmadd_ps(_mm512_load_ps(qg + v * 16), kv[v], dot);
          _mm512_store_ps(dots[g] + 16 * kTokenSlot[j], dot);
        }
        for (int v = 0; v < NV; ++v) _mm512_store_ps(vf + j * D + v * 16, load16(vh + offset[j] + v * 16, km[v]));
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t hg = h * G + g;
        const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        __m512 sv = _mm512_mask_mov_ps(ninf, valid, sum16(dots[g]));  // lanes past the chunk's tokens: -inf
        if (softcap != 0.0f) {  // transformers' order: scores * scale, then cap * tanh(scores / cap)
          _mm512_store_ps(s[g], sv);
          for (int64_t j = 0; j < n; ++j) s[g][j] = softcap * std::tanh(s[g][j] * scale / softcap);
          sv = _mm512_mask_load_ps(ninf, valid, s[g]);
        }
        const float m_new = std::max(m[hg], _mm512_reduce_max_ps(sv));
        const float correction = m[hg] == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(m[hg] - m_new);
        const __m512 p = exp512(_mm512_sub_ps(sv, _mm512_set1_ps(m_new)));  // invalid lanes: exp(-inf) = 0
        l[hg] = l[hg] * correction + _mm512_reduce_add_ps(p);
        m[hg] = m_new;
        _mm512_store_ps(s[g], p);
        float* ag = acc + hg * D;
        __m512 a[NV];
        const __m512 c = _mm512_set1_ps(correction);
        for (int v = 0; v < NV; ++v) a[v] = _mm512_mul_ps(_mm512_load_ps(ag + v * 16), c);
        for (int64_t j = 0; j < n; ++j) {
          const __m512 pj = _mm512_set1_ps(s[g][j]);
          for (int v = 0; v < NV; ++v) a[v] = _mm512_fmadd_ps(pj, _mm512_load_ps(vf + j * D + v * 16), a[v]);
        }
        for (int v = 0; v < NV; ++v) _mm512_store_ps(ag + v * 16, a[v]);
      }
    }
  }
  for (int64_t g = 0; g < heads; ++g) {
    const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
    for (int64_t i = 0; i < dim; ++i) out[g * dim + i] = static_cast<T>(acc[g * D + i] * inv);
  }
}

template <typename T, int NV>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& tables,
         const at::Tensor& seq_lens, int64_t window, double scale, double softcap, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), kvh = k_cache.size(2), W = tables.size(1);
  const int64_t G = Hq / kvh;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  // Work items: (sequence, range of kv heads). Whole sequences read the cache in order; with few
  // sequences the kv heads are split so that every thread has work.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min(kvh, std::max<int64_t>(1, (4 * threads + B - 1) / B));
  const int64_t items = B * splits;
  // Longest sequences first, handed out one at a time to whichever thread is free (at::parallel_for
  // alone splits the range evenly up front: sequences of very different lengths, or a thread that
  // loses its core to a neighbour, would leave the others waiting at the end).
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return lp[x] > lp[y]; });
  std::atomic<int64_t> next{0};
  auto work_loop = [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t b = order[i / splits], part = i % splits;
      const int64_t h0 = kvh * part / splits, h1 = kvh * (part + 1) / splits;
      const int64_t len = lp[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      attend<T, NV>(qp + (b * Hq + h0 * G) * D, kp + h0 * D, vp + h0 * D, tp + b * W, first, len, h1 - h0, G, D,
                    block_size, kvh * D, static_cast<float>(scale), static_cast<float>(softcap),
                    op + (b * Hq + h0 * G) * D);
    }
  };
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += lp[b];
  // Small steps (a few short sequences) are not worth waking the other threads for.
  if (threads == 1 || work * kvh * D < (1 << 16)) {
    work_loop(0, 1);
  } else {
    at::parallel_for(0, std::min(threads, items), 1, work_loop);
  }
}

template <typename T>
void dispatch_dim(int64_t D, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& t,
                  const at::Tensor& lens, int64_t window, double scale, double softcap, at::Tensor& out) {
  // Vectors of 16 per head: a few sizes compiled, each head size runs in the smallest that holds it.
  if (D <= 16) return run<T, 1>(q, k, v, t, lens, window, scale, softcap, out);
  if (D <= 32) return run<T, 2>(q, k, v, t, lens, window, scale, softcap, out);
  if (D <= 64) return run<T, 4>(q, k, v, t, lens, window, scale, softcap, out);
  if (D <= 96) return run<T, 6>(q, k, v, t, lens, window, scale, softcap, out);
  if (D <= 128) return run<T, 8>(q, k, v, t, lens, window, scale, softcap, out);
  if (D <= 256) return run<T, 16>(q, k, v, t, lens, window, scale, softcap, out);
  TORCH_CHECK(false, "paged_decode: head_dim ", D, " is over 256");
}

at::Tensor paged_decode(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables_in, const at::Tensor& seq_lens_in, int64_t window, double scale,
                        double softcap) {
  TORCH_CHECK(q_in.dim() == 3, "paged_decode: q must be [batch, q_heads, head_dim], got ", q_in.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "paged_decode: caches must be [blocks, block_size, kv_heads, head_dim] and alike, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: caches must be contiguous");
  TORCH_CHECK(q_in.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_decode: q and the caches must share one dtype, got ", q_in.scalar_type(), ", ",
              k_cache.scalar_type(), ", ", v_cache.scalar_type());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t blocks = k_cache.size(0), block_size = k_cache.size(1), kvh = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "paged_decode: head_dim of q (", D, ") and cache (", k_cache.size(3), ") differ");
  TORCH_CHECK(kvh > 0 && Hq % kvh == 0 && Hq / kvh <= kMaxGroup, "paged_decode: ", Hq, " query heads over ", kvh,
              " kv heads (at most ", kMaxGroup, " per kv head)");
  TORCH_CHECK(tables_in.dim() == 2 && tables_in.size(0) == B && seq_lens_in.dim() == 1 && seq_lens_in.size(0) == B,
              "paged_decode: block_tables must be [batch, width] and seq_lens [batch], got ", tables_in.sizes(),
              " and ", seq_lens_in.sizes());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor tables = tables_in.to(at::kLong).contiguous();
  const at::Tensor seq_lens = seq_lens_in.to(at::kLong).contiguous();
  // A bad table entry would read outside the cache: every entry a sequence uses is checked.
  const int64_t W = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= W * block_size, "paged_decode: sequence ", b, " has length ", lp[b],
                " but its block table covers ", W * block_size, " tokens");
    const int64_t first = window > 0 ? std::max<int64_t>(0, lp[b] - window) : 0;
    for (int64_t i = first / block_size; i * block_size < lp[b]; ++i)
      TORCH_CHECK(tp[b * W + i] >= 0 && tp[b * W + i] < blocks, "paged_decode: sequence ", b, " block ", i,
                  " is ", tp[b * W + i], ", outside the cache's ", blocks, " blocks");
  }
  at::Tensor out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat: dispatch_dim<float>(D, q, k_cache, v_cache, tables, seq_lens, window, scale, softcap, out); break;
    case at::kBFloat16:
      dispatch_dim<c10::BFloat16>(D, q, k_cache, v_cache, tables, seq_lens, window, scale, softcap, out);
      break;
    case at::kHalf: dispatch_dim<c10::Half>(D, q, k_cache, v_cache, tables, seq_lens, window, scale, softcap, out); break;
    default: TORCH_CHECK(false, "paged_decode: dtype ", q.scalar_type(), " is not float32, bfloat16 or float16");
  }
  return out;
}

// The step's new keys and values written to their slots first (k_new, v_new: [B, kv_heads, D], one
// token per sequence, unit stride along D; slots [B], flat indices into [blocks * block_size]), then
// paged_decode: one call where write_kv_cache took two index_copy_ and their views, per layer.
at::Tensor paged_decode_write(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                              const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots_in,
                              const at::Tensor& tables, const at::Tensor& seq_lens, int64_t window, double scale,
                              double softcap) {
  const int64_t B = q.size(0);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "paged_decode_write: caches must be contiguous [blocks, block_size, kv_heads, head_dim]");
  const int64_t rows = k_cache.size(0) * k_cache.size(1), kvh = k_cache.size(2), D = k_cache.size(3);
  for (const at::Tensor* t : {&k_new, &v_new})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->size(1) == kvh && t->size(2) == D && t->stride(2) == 1 &&
                t->scalar_type() == k_cache.scalar_type(),
                "paged_decode_write: new keys and values must be [batch, kv_heads, head_dim] in the cache's dtype, got ",
                t->sizes());
  TORCH_CHECK(slots_in.dim() == 1 && slots_in.size(0) == B, "paged_decode_write: slots must be [batch]");
  const at::Tensor slots = slots_in.to(at::kLong).contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t esize = k_cache.element_size();
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(k_new.data_ptr());
  const char* vp = static_cast<const char*>(v_new.data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < rows, "paged_decode_write: slot ", sp[b], " is outside the cache's ", rows);
    for (int64_t h = 0; h < kvh; ++h) {
      const int64_t dst = (sp[b] * kvh + h) * D * esize;
      std::memcpy(kc + dst, kp + (b * k_new.stride(0) + h * k_new.stride(1)) * esize, D * esize);
      std::memcpy(vc + dst, vp + (b * v_new.stride(0) + h * v_new.stride(1)) * esize, D * esize);
    }
  }
  return paged_decode(q, k_cache, v_cache, tables, seq_lens, window, scale, softcap);
}

}  // namespace

TORCH_LIBRARY(lmserve_attn, lib) {
  lib.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
          "int window, float scale, float softcap) -> Tensor");
  lib.def("paged_decode_write(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
          "Tensor slots, Tensor block_tables, Tensor seq_lens, int window, float scale, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmserve_attn, CPU, lib) {
  lib.impl("paged_decode", &paged_decode);
  lib.impl("paged_decode_write", &paged_decode_write);
}
