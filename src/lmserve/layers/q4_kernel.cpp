// Batch-few int4 x int8 linear for CPUs with AVX512-VNNI (lmserve/layers/q4_kernel.py says why).
//
// Weights: per output row n, K/32 blocks of 32 codes q in [0, 15] with one fp16 scale d and one
// fp16 offset m (w = d * q + m: llama.cpp's Q4_1). A row's codes are packed two per byte in
// chunks of 4 blocks (then one of 2 and one of 1 for what remains): in a chunk of c blocks
// (16c bytes), byte i holds code i in its low nibble and code 16c + i in its high nibble, so one
// load unpacks (and, shift, and) into the chunk's codes in input order.
//
// Activations are quantized per block of 32 to int8 (x ~ dx * qx, llama.cpp's Q8_1) once per
// call; a block's product is then d * dx * sum(q * qx) + m * dx * sum(qx), the sum of products
// one vpdpbusd (u8 x s8 -> s32) per 64 weights.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 4;  // activation rows a weight row is dotted with per pass
constexpr int64_t kTile = 16;    // weight rows that stay in L1 while every activation row passes over them
constexpr int64_t kMaxBlocks = 1024;  // K up to 32768

// One activation row of K floats -> int8 codes, a scale per block, and the block's dx * sum(qx).
void quantize_row(const float* x, int64_t K, int8_t* qx, float* dx, float* xs) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    __m512 v0 = _mm512_loadu_ps(x + b * kBlock);
    __m512 v1 = _mm512_loadu_ps(x + b * kBlock + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float d = amax / 127.0f;
    float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));  // round to nearest
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qx + b * kBlock), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qx + b * kBlock + 16), _mm512_cvtsepi32_epi8(q1));
    dx[b] = d;
    xs[b] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
  }
}

// Rows [n0, n1) of y for R activation rows starting at qx (row stride K), written as floats.
template <int R>
void dot_rows(int64_t n0, int64_t n1, int64_t K, const uint8_t* codes, const at::Half* d, const at::Half* m,
              const int8_t* qx, const float* dx, const float* xs, float* y, int64_t y_stride) {
  const int64_t nb = K / kBlock;
  const int64_t quads = nb / 4;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m512i low512 = _mm512_set1_epi8(0x0F);
  const __m512i first_pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i second_pair = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  float ds[R * kMaxBlocks];  // d[b] * dx[r][b] of the current weight row
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = codes + n * (K / 2);
    const auto* dn = reinterpret_cast<const uint16_t*>(d) + n * nb;
    const auto* mn = reinterpret_cast<const uint16_t*>(m) + n * nb;
    // Per block: the scale of its integer sum (d * dx) and the offset term m * dx * sum(qx).
    __m512 macc[R];
    for (int r = 0; r < R; ++r) macc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 16) {
      const __mmask16 k = nb - b >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (nb - b)) - 1);
      const __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, dn + b));
      const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mn + b));
      for (int r = 0; r < R; ++r) {
        _mm512_mask_storeu_ps(ds + r * nb + b, k, _mm512_mul_ps(dv, _mm512_maskz_loadu_ps(k, dx + r * nb + b)));
        macc[r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, xs + r * nb + b), macc[r]);
      }
    }
    float moff[R];
    for (int r = 0; r < R; ++r) moff[r] = _mm512_reduce_add_ps(macc[r]);
    __m512 acc[R], acc2[R];  // two chains: the adds of consecutive chunks need not wait on each other
    for (int r = 0; r < R; ++r) acc[r] = acc2[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < quads; ++g) {  // 4 blocks: one 512-bit load unpacks into 128 codes
      const __m512i v = _mm512_loadu_si512(c + g * 64);
      const __m512i lo = _mm512_and_si512(v, low512);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low512);
      for (int r = 0; r < R; ++r) {
        const int8_t* a = qx + r * K + g * 128;
        const __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(a));
        const __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, _mm512_loadu_si512(a + 64));
        const __m512 sc = _mm512_castps128_ps512(_mm_loadu_ps(ds + r * nb + 4 * g));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_permutexvar_ps(first_pair, sc), acc[r]);
        acc2[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_permutexvar_ps(second_pair, sc), acc2[r]);
      }
    }
    if (nb % 4 >= 2) {  // a remaining pair of blocks: 32 bytes unpack into 64 codes
      const int64_t b = quads * 4;
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * 16));
      __m256i lo = _mm256_and_si256(v, low);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      for (int r = 0; r < R; ++r) {
        __m512i a = _mm512_loadu_si512(qx + r * K + b * kBlock);
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a);
        const float* sc = ds + r * nb + b;
        __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(sc[0]), _mm256_set1_ps(sc[1]), 1);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
      }
    }
    float tail[R];
    for (int r = 0; r < R; ++r) tail[r] = 0.0f;
    if (nb % 2) {  // the odd last block: 16 bytes, codes i and 16 + i in byte i
      const int64_t b = nb - 1;
      __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + b * 16));
      __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
      __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
      __m256i w = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
      for (int r = 0; r < R; ++r) {
        __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + r * K + b * kBlock));
        __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a);
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        tail[r] = static_cast<float>(_mm_cvtsi128_si32(s4)) * ds[r * nb + b];
      }
    }
    for (int r = 0; r < R; ++r) y[r * y_stride + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r])) + tail[r] + moff[r];
  }
}

// The sum of each of four vectors' lanes, as the four lanes of one 128-bit vector.
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // Halve twice within each vector while interleaving the four (two shuffles and adds per level).
  __m256 ab = _mm256_hadd_ps(_mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)),
                             _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1)));
  __m256 cd = _mm256_hadd_ps(_mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1)),
                             _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1)));
  __m256 abcd = _mm256_hadd_ps(ab, cd);  // lanes: a0+a1, b.., c.., d.. per 128-bit half
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// One activation row (a decode step's) against weight rows [n0, n1), four weight rows at a time:
// the activation's codes are loaded once per four rows, each block's scale d * dx is formed in
// registers (no staging through memory), the offsets accumulate in the same vectors, and the four
// rows' sums are reduced together.
//
// kQ8 = false: Q4_1 rows (dot_rows's layout); rows past a multiple of four take dot_rows<1>, the
// same products and sums in another order. kQ8 = true: Q8_0 rows stored as u = q + 128 (uint8, K
// per row, blocks in order), so that vpdpbusd's unsigned operand is the weight: d * dx * sum(q * qx)
// = d * dx * sum(u * qx) - 128 * d * dx * sum(qx), the second term an offset like Q4_1's m term;
// any rows past a multiple of four run one at a time through the same loop.
template <bool kQ8>
void dot_rows_one(int64_t n0, int64_t n1, int64_t K, const uint8_t* codes, const at::Half* d, const at::Half* m,
                  const int8_t* qx, const float* dx, const float* xs, float* y) {
  constexpr int T = 4;
  const int64_t nb = K / kBlock, quads = nb / 4, row_bytes = kQ8 ? K : K / 2;
  const __m512i low512 = _mm512_set1_epi8(0x0F);
  const __m512i first_pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i second_pair = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  const auto* d16 = reinterpret_cast<const uint16_t*>(d);
  // The offset's per-block factor: m (Q4_1), or d times -128 (Q8_0 as u - 128).
  const auto* off16 = reinterpret_cast<const uint16_t*>(kQ8 ? d : m);
  const __m512 off_scale = _mm512_set1_ps(kQ8 ? -128.0f : 1.0f);
  int64_t n = n0;
  for (; n < n1; n += T) {
    const int rows = static_cast<int>(std::min<int64_t>(T, n1 - n));
    if (rows < T && !kQ8) break;
    __m512 acc[T], acc2[T];
    for (int j = 0; j < T; ++j) {  // the offsets first: sum over blocks of (m or -128 d) * dx * sum(qx)
      __m512 macc = _mm512_setzero_ps();
      const uint16_t* oj = off16 + (n + std::min(j, rows - 1)) * nb;
      for (int64_t b = 0; b < nb; b += 16) {
        const __mmask16 k = nb - b >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (nb - b)) - 1);
        macc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, oj + b)), _mm512_maskz_loadu_ps(k, xs + b), macc);
      }
      acc[j] = _mm512_mul_ps(macc, off_scale);
      acc2[j] = _mm512_setzero_ps();
    }
    // Rows past the last whole four (Q8 only) repeat the last row: computed, never stored.
    auto row_of = [&](int j) { return n + std::min(j, rows - 1); };
    for (int64_t g = 0; g < quads; ++g) {
      const __m512i a0 = _mm512_loadu_si512(qx + g * 128);
      const __m512i a1 = _mm512_loadu_si512(qx + g * 128 + 64);
      const __m128 dx4 = _mm_loadu_ps(dx + 4 * g);
      for (int j = 0; j < T; ++j) {
        __m512i w0, w1;
        if constexpr (kQ8) {
          w0 = _mm512_loadu_si512(codes + row_of(j) * row_bytes + g * 128);
          w1 = _mm512_loadu_si512(codes + row_of(j) * row_bytes + g * 128 + 64);
        } else {
          const __m512i v = _mm512_loadu_si512(codes + row_of(j) * row_bytes + g * 64);
          w0 = _mm512_and_si512(v, low512);
          w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low512);
        }
        const __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, a0);
        const __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, a1);
        const __m128i d4 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(d16 + row_of(j) * nb + 4 * g));
        const __m512 sc = _mm512_castps128_ps512(_mm_mul_ps(_mm_cvtph_ps(d4), dx4));
        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_permutexvar_ps(first_pair, sc), acc[j]);
        acc2[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_permutexvar_ps(second_pair, sc), acc2[j]);
      }
    }
    if (nb % 4 >= 2) {  // a remaining pair of blocks: 64 codes per row
      const int64_t b = quads * 4;
      const __m512i a = _mm512_loadu_si512(qx + b * kBlock);
      const __m256i low = _mm256_set1_epi8(0x0F);
      for (int j = 0; j < T; ++j) {
        __m512i w;
        if constexpr (kQ8) {
          w = _mm512_loadu_si512(codes + row_of(j) * row_bytes + b * kBlock);
        } else {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + row_of(j) * row_bytes + b * 16));
          w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low)),
                                 _mm256_and_si256(_mm256_srli_epi16(v, 4), low), 1);
        }
        const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a);
        const float s0 = _cvtsh_ss(d16[row_of(j) * nb + b]) * dx[b];
        const float s1 = _cvtsh_ss(d16[row_of(j) * nb + b + 1]) * dx[b + 1];
        const __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);
        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[j]);
      }
    }
    if (nb % 2) {  // the odd last block: 32 codes per row
      const int64_t b = nb - 1;
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + b * kBlock));
      for (int j = 0; j < T; ++j) {
        __m256i w;
        if constexpr (kQ8) {
          w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + row_of(j) * row_bytes + b * kBlock));
        } else {  // codes i and 16 + i in byte i
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + row_of(j) * row_bytes + b * 16));
          w = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(v, _mm_set1_epi8(0x0F))),
                                      _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F)), 1);
        }
        const __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a);
        const float sc = _cvtsh_ss(d16[row_of(j) * nb + b]) * dx[b];
        // Zero-extended: the upper lanes add nothing.
        acc[j] = _mm512_fmadd_ps(_mm512_zextps256_ps512(_mm256_cvtepi32_ps(s)), _mm512_set1_ps(sc), acc[j]);
      }
    }
    float sums[T];
    _mm_storeu_ps(sums, reduce4(_mm512_add_ps(acc[0], acc2[0]), _mm512_add_ps(acc[1], acc2[1]),
                                _mm512_add_ps(acc[2], acc2[2]), _mm512_add_ps(acc[3], acc2[3])));
    for (int j = 0; j < rows; ++j) y[n + j] = sums[j];
  }
  if constexpr (!kQ8) {
    if (n < n1) dot_rows<1>(n, n1, K, codes, d, m, qx, dx, xs, y, 0);
  }
}

void dot_rows_any(int R, int64_t n0, int64_t n1, int64_t K, const uint8_t* codes, const at::Half* d,
                  const at::Half* m, const int8_t* qx, const float* dx, const float* xs, float* y, int64_t ys) {
  switch (R) {
    case 1: return dot_rows<1>(n0, n1, K, codes, d, m, qx, dx, xs, y, ys);
    case 2: return dot_rows<2>(n0, n1, K, codes, d, m, qx, dx, xs, y, ys);
    case 3: return dot_rows<3>(n0, n1, K, codes, d, m, qx, dx, xs, y, ys);
    default: return dot_rows<4>(n0, n1, K, codes, d, m, qx, dx, xs, y, ys);
  }
}

// The activation rows [M, K] of one call, each rounded to int8 per block of 32 (quantize_row).
struct QuantizedRows {
  std::vector<int8_t> qx;
  std::vector<float> dx, xs;
  explicit QuantizedRows(const at::Tensor& x) {
    const int64_t M = x.size(0), K = x.size(1), nb = K / kBlock;
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    qx.resize(M * K);
    dx.resize(M * nb);
    xs.resize(M * nb);
    for (int64_t r = 0; r < M; ++r)
      quantize_row(xf.data_ptr<float>() + r * K, K, qx.data() + r * K, dx.data() + r * nb, xs.data() + r * nb);
  }
};

// scales_mins: [2, N, K / 32] float16, the blocks' d then m (one tensor: a call from Python indexes nothing).
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales_mins) {
  TORCH_CHECK(x.dim() == 2, "x must be [rows, K]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && scales_mins.scalar_type() == at::kHalf,
              "codes uint8, scales_mins float16");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(K % kBlock == 0 && K / kBlock <= kMaxBlocks && codes.size(1) == K / 2 && scales_mins.dim() == 3 &&
              scales_mins.size(0) == 2 && scales_mins.size(1) == N && scales_mins.size(2) == K / kBlock,
              "shapes do not match: x ", x.sizes(), ", codes ", codes.sizes(), ", scales_mins ", scales_mins.sizes());
  const int64_t nb = K / kBlock;
  const QuantizedRows a(x);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const uint8_t* c = codes.contiguous().data_ptr<uint8_t>();
  const at::Tensor sm = scales_mins.contiguous();
  const at::Half* dp = sm.data_ptr<at::Half>();
  const at::Half* mp = dp + N * nb;
  float* yp = y.data_ptr<float>();
  // Split the weight rows among torch's intra-op threads: each streams its share of the weights once.
  // Within a share, a tile of weight rows is read from memory once and reused from L1 by every
  // group of activation rows (prefill-sized products stay compute-bound, not memory-bound).
  at::parallel_for(0, N, kTile, [&](int64_t n0, int64_t n1) {
    if (M == 1) {  // a decode step's product: four weight rows at a time
      dot_rows_one<false>(n0, n1, K, c, dp, mp, a.qx.data(), a.dx.data(), a.xs.data(), yp);
      return;
    }
    for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
      const int64_t t1 = std::min(t0 + kTile, n1);
      for (int64_t r = 0; r < M; r += kMaxRows) {
        const int R = static_cast<int>(std::min<int64_t>(kMaxRows, M - r));
        dot_rows_any(R, t0, t1, K, c, dp, mp, a.qx.data() + r * K, a.dx.data() + r * nb, a.xs.data() + r * nb,
                     yp + r * N, N);
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// Q8_0 weights (llama.cpp's 8-bit blocks, w = d * q per block of 32) stored as u = q + 128:
// codes_u8 [N, K] uint8, d [N, K / 32] float16. Each activation row runs the one-row kernel (the
// LM head of a decode step: one row per sequence).
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d) {
  TORCH_CHECK(x.dim() == 2, "x must be [rows, K]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && d.scalar_type() == at::kHalf, "codes uint8 (q + 128), d float16");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(K % kBlock == 0 && K / kBlock <= kMaxBlocks && codes.size(1) == K && d.dim() == 2 && d.size(0) == N &&
              d.size(1) == K / kBlock, "shapes do not match: x ", x.sizes(), ", codes ", codes.sizes(), ", d ", d.sizes());
  const int64_t nb = K / kBlock;
  const QuantizedRows a(x);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const uint8_t* c = codes.contiguous().data_ptr<uint8_t>();
  const at::Tensor dc = d.contiguous();
  const at::Half* dp = dc.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, kTile, [&](int64_t n0, int64_t n1) {
    for (int64_t r = 0; r < M; ++r)
      dot_rows_one<true>(n0, n1, K, c, dp, dp, a.qx.data() + r * K, a.dx.data() + r * nb, a.xs.data() + r * nb,
                         yp + r * N);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(lmserve_q4, lib) {
  lib.def("linear(Tensor x, Tensor codes, Tensor scales_mins) -> Tensor");
  lib.def("linear_q8(Tensor x, Tensor codes, Tensor d) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmserve_q4, CPU, lib) {
  lib.impl("linear", &q4_linear);
  lib.impl("linear_q8", &q8_linear);
}
