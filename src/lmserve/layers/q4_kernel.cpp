// Batch-few int4 (and int8) x int8 linear for CPUs with AVX512-VNNI (lmserve/layers/q4_kernel.py says why).
//
// Weights are stored in tiles of 16 output columns (rows of W). Per tile and per block of 32 inputs:
// - Q4_1 (int4): 256 bytes of codes q in [0, 15], w = d * q + m with one fp16 d and one fp16 m per
//   column and block (llama.cpp's Q4_1). Load L (of 4, 64 bytes) holds in byte 4c + i the codes of
//   column c at inputs 4L + i (low nibble) and 16 + 4L + i (high nibble): one load unpacks
//   (and, shift, and) into two vectors of 16 columns x 4 consecutive inputs, vpdpbusd's layout.
//   Then 64 bytes of scales: the block's 16 d, then its 16 m.
// - Q8_0 (int8): 512 bytes of u = q + 128 (w = d * q), load j (of 8) holding inputs 4j..4j+3 of each
//   column; then the block's 16 d.
//
// Activations are quantized per block of 32 to int8 (x ~ dx * qx, llama.cpp's Q8_1) once per call.
// A block's product for 16 columns and one activation row is then 8 vpdpbusd (u8 weights x the row's
// 4 codes broadcast, accumulated in int32 per column), one conversion, and the scales in float:
// d * dx * sum(q * qx) + m * dx * sum(qx) (Q8_0: m = -128 d). Each weight is unpacked once per up to
// 8 activation rows, and no horizontal sum is ever taken: the columns are the vector's lanes.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kCols = 16;     // output columns per tile: one vector's lanes
constexpr int kMaxRows = 8;       // activation rows per pass over a tile (the accumulators stay in registers)
constexpr int64_t kAhead = 2048;  // bytes of codes prefetched ahead of the block being read

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

template <bool kQ8>
constexpr int64_t code_bytes() { return kQ8 ? kBlock * kCols : kBlock * kCols / 2; }  // per tile and block
template <bool kQ8>
constexpr int64_t scale_halves() { return kQ8 ? kCols : 2 * kCols; }  // fp16 scales per tile and block

// One tile's 16 columns for R activation rows (row r at qx + r * K, its scales at dx/xs + r * nb),
// written as floats to y + r * y_stride (the first `cols` lanes).
template <bool kQ8, int R>
void tile_rows(const uint8_t* codes, const uint16_t* scales, int64_t nb, const int8_t* qx, const float* dx,
               const float* xs, float* y, int64_t y_stride, __mmask16 cols) {
  const int64_t K = nb * kBlock;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = codes + b * code_bytes<kQ8>();
    for (int64_t line = 0; line < code_bytes<kQ8>(); line += 64)  // past the tile's end: the next tile's
      _mm_prefetch(reinterpret_cast<const char*>(p + kAhead + line), _MM_HINT_T0);
    __m512i w[8];  // w[j]: inputs 4j..4j+3 of the block for each column
    for (int j = 0; j < 4; ++j) {
      if constexpr (kQ8) {
        w[j] = _mm512_loadu_si512(p + 64 * j);
        w[j + 4] = _mm512_loadu_si512(p + 64 * (j + 4));
      } else {
        const __m512i v = _mm512_loadu_si512(p + 64 * j);
        w[j] = _mm512_and_si512(v, low);
        w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    }
    const uint16_t* s = scales + b * scale_halves<kQ8>();
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    const __m512 m = kQ8 ? _mm512_mul_ps(d, _mm512_set1_ps(-128.0f))
                         : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + kCols)));
    for (int r = 0; r < R; ++r) {
      const int32_t* a = reinterpret_cast<const int32_t*>(qx + r * K + b * kBlock);
      // Two chains of four: the second need not wait on the first's latency.
      __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(a[0]));
      __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_set1_epi32(a[1]));
      for (int j = 2; j < 8; j += 2) {
        s0 = _mm512_dpbusd_epi32(s0, w[j], _mm512_set1_epi32(a[j]));
        s1 = _mm512_dpbusd_epi32(s1, w[j + 1], _mm512_set1_epi32(a[j + 1]));
      }
      const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[r * nb + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), scale, acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[r * nb + b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * y_stride, cols, acc[r]);
}

template <bool kQ8>
void tile_rows_any(int R, const uint8_t* codes, const uint16_t* scales, int64_t nb, const int8_t* qx,
                   const float* dx, const float* xs, float* y, int64_t y_stride, __mmask16 cols) {
  using Fn = void (*)(const uint8_t*, const uint16_t*, int64_t, const int8_t*, const float*, const float*, float*,
                      int64_t, __mmask16);
  static constexpr Fn kByRows[kMaxRows] = {tile_rows<kQ8, 1>, tile_rows<kQ8, 2>, tile_rows<kQ8, 3>,
                                           tile_rows<kQ8, 4>, tile_rows<kQ8, 5>, tile_rows<kQ8, 6>,
                                           tile_rows<kQ8, 7>, tile_rows<kQ8, 8>};
  kByRows[R - 1](codes, scales, nb, qx, dx, xs, y, y_stride, cols);
}

// y [M, N] = x [M, K] times the tiled weight (codes [tiles, nb * code_bytes], scales [tiles, nb * scale_halves]).
template <bool kQ8>
at::Tensor tiled_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t N) {
  TORCH_CHECK(x.dim() == 2, "x must be [rows, K]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf, "codes uint8, scales float16");
  const int64_t M = x.size(0), K = x.size(1), nb = K / kBlock, tiles = (N + kCols - 1) / kCols;
  TORCH_CHECK(K % kBlock == 0 && codes.dim() == 2 && codes.size(0) == tiles &&
              codes.size(1) == nb * code_bytes<kQ8>() && scales.dim() == 2 && scales.size(0) == tiles &&
              scales.size(1) == nb * scale_halves<kQ8>(),
              "shapes do not match: x ", x.sizes(), ", codes ", codes.sizes(), ", scales ", scales.sizes(), ", n ", N);
  const QuantizedRows a(x);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const at::Tensor c = codes.contiguous(), s = scales.contiguous();
  const uint8_t* cp = c.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  // Tiles are split among torch's intra-op threads: each streams its share of the weights once.
  // A tile (nb * 256 bytes for int4: 4.5 KiB at K = 576) stays in L1 while every group of up to
  // 8 activation rows passes over it.
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t left = N - t * kCols;
      const __mmask16 cols = left >= kCols ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      for (int64_t r = 0; r < M; r += kMaxRows) {
        const int R = static_cast<int>(std::min<int64_t>(kMaxRows, M - r));
        tile_rows_any<kQ8>(R, cp + t * nb * code_bytes<kQ8>(), sp + t * nb * scale_halves<kQ8>(), nb,
                           a.qx.data() + r * K, a.dx.data() + r * nb, a.xs.data() + r * nb, yp + r * N + t * kCols,
                           N, cols);
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// Q4_1 tiles: codes [N / 16, K / 32 * 256] uint8, scales_mins [N / 16, K / 32 * 32] float16 (N a multiple of 16).
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales_mins) {
  return tiled_linear<false>(x, codes, scales_mins, codes.size(0) * kCols);
}

// Q8_0 tiles (u = q + 128): codes [ceil(n / 16), K / 32 * 512] uint8, d [ceil(n / 16), K / 32 * 16] float16.
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d, int64_t n) {
  return tiled_linear<true>(x, codes, d, n);
}

}  // namespace

TORCH_LIBRARY(lmserve_q4, lib) {
  lib.def("linear(Tensor x, Tensor codes, Tensor scales_mins) -> Tensor");
  lib.def("linear_q8(Tensor x, Tensor codes, Tensor d, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmserve_q4, CPU, lib) {
  lib.impl("linear", &q4_linear);
  lib.impl("linear_q8", &q8_linear);
}
