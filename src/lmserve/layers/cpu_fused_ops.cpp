// A decoder layer's small ops as one call each on the CPU: RMSNorm (with the residual add before it),
// rotary, act(gate) * up. The CPU twin of layers/triton_ops.py; layers/cpu_fused_ops.py says why.
//
// Numerics follow the PyTorch modules they replace (layers/norm.py, rotary.py, mlp.py) rounding for
// rounding: every intermediate PyTorch materializes in the activation dtype is rounded to it here
// too (`round_to<T>`), products and sums are float32 as PyTorch's CPU kernels compute half types.
// What may differ: the order of the RMSNorm's float32 sum of squares, and the last bits of
// exp/tanh/erf (libm here, Sleef in PyTorch's vectorized kernels).
//
// Rows run in parallel (torch's threads) only when there are enough of them to pay for waking the
// pool: a decode step's single row runs on the calling thread, with no parallel region at all.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kParallelElements = 1 << 15;  // per chunk of rows handed to one thread

int64_t grain_rows(int64_t elements_per_row) {
  return std::max<int64_t>(1, kParallelElements / std::max<int64_t>(elements_per_row, 1));
}

template <typename T>
inline float round_to(float v) {  // v as PyTorch would store it in a T tensor, read back
  return static_cast<float>(static_cast<T>(v));
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [rows, n] with unit stride along n");
}

// ---- RMSNorm -------------------------------------------------------------------------------------

// Llama: weight * rms_norm(x.float()).to(T)   (out in promote(weight, T): W)
// Gemma: (rms_norm(x.float()) * (1 + weight.float())).to(T)
// With delta: x + delta first, rounded to T and stored in `total` (the next residual), then normed.
template <typename T, typename W>
void rms_norm_rows(const torch::Tensor& x, const torch::Tensor* delta, const torch::Tensor& weight, double eps,
                   bool gemma, torch::Tensor& out, torch::Tensor* total) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* dp = delta ? delta->data_ptr<T>() : nullptr;
  const W* wp = weight.data_ptr<W>();
  T* tp = total ? total->data_ptr<T>() : nullptr;
  const int64_t sx = x.stride(0), sd = delta ? delta->stride(0) : 0, st = total ? total->stride(0) : 0;
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * sx;
      if (dp) {
        const T* dr = dp + r * sd;
        T* tr = tp + r * st;
        for (int64_t c = 0; c < n; ++c) {
          T s = static_cast<T>(static_cast<float>(xr[c]) + static_cast<float>(dr[c]));
          tr[c] = s;
          row[c] = static_cast<float>(s);
        }
      } else {
        for (int64_t c = 0; c < n; ++c) row[c] = static_cast<float>(xr[c]);
      }
      // 16 partial sums (one AVX512 register's lanes), then their total.
      float partial[16] = {0};
      int64_t c = 0;
      for (; c + 16 <= n; c += 16)
        for (int j = 0; j < 16; ++j) partial[j] += row[c + j] * row[c + j];
      for (; c < n; ++c) partial[c & 15] += row[c] * row[c];
      float sum = 0.f;
      for (int j = 0; j < 16; ++j) sum += partial[j];
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + feps);
      if (gemma) {
        T* o = out.data_ptr<T>() + r * out.stride(0);
        for (int64_t k = 0; k < n; ++k)
          o[k] = static_cast<T>(row[k] * inv * (1.0f + static_cast<float>(wp[k])));
      } else {
        W* o = out.data_ptr<W>() + r * out.stride(0);
        for (int64_t k = 0; k < n; ++k)
          o[k] = static_cast<W>(static_cast<float>(wp[k]) * round_to<T>(row[k] * inv));
      }
    }
  });
}

template <typename T>
void rms_norm_dispatch_weight(const torch::Tensor& x, const torch::Tensor* delta, const torch::Tensor& weight,
                              double eps, bool gemma, torch::Tensor& out, torch::Tensor* total) {
  if (weight.scalar_type() == torch::kFloat)
    rms_norm_rows<T, float>(x, delta, weight, eps, gemma, out, total);
  else
    rms_norm_rows<T, T>(x, delta, weight, eps, gemma, out, total);
}

std::tuple<torch::Tensor, torch::Tensor> rms_norm_impl(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                                                       const torch::Tensor& weight, double eps, bool gemma) {
  check_rows(x, "x");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kBFloat16 || dt == torch::kHalf, "x must be bfloat16 or float16");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1), "weight must be [n]");
  TORCH_CHECK(weight.scalar_type() == dt || weight.scalar_type() == torch::kFloat, "weight must be x's dtype or float32");
  auto out_dtype = gemma ? dt : c10::promoteTypes(weight.scalar_type(), dt);
  auto out = torch::empty(x.sizes(), x.options().dtype(out_dtype));
  torch::Tensor total;
  if (delta.has_value()) {
    check_rows(*delta, "delta");
    TORCH_CHECK(delta->scalar_type() == dt && delta->sizes() == x.sizes(), "delta must match x");
    total = torch::empty(x.sizes(), x.options());
  }
  const torch::Tensor* dp = delta.has_value() ? &*delta : nullptr;
  torch::Tensor* tp = delta.has_value() ? &total : nullptr;
  if (dt == torch::kBFloat16)
    rms_norm_dispatch_weight<at::BFloat16>(x, dp, weight, eps, gemma, out, tp);
  else
    rms_norm_dispatch_weight<at::Half>(x, dp, weight, eps, gemma, out, tp);
  return {out, total};
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, bool gemma) {
  return std::get<0>(rms_norm_impl(x, c10::nullopt, weight, eps, gemma));
}

std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& delta,
                                                      const torch::Tensor& weight, double eps, bool gemma) {
  auto [out, total] = rms_norm_impl(x, delta, weight, eps, gemma);
  return {total, out};
}

// ---- act(gate) * up -------------------------------------------------------------------------------

// PyTorch's formulas in their order of operations (aten/src/ATen/native/cpu/Activation.cpp).
inline float silu(float v) { return v / (1.0f + std::exp(-v)); }
inline float gelu_tanh(float v) {
  constexpr float kBeta = 0.7978845608028654f, kKappa = 0.044715f;
  const float inner = kBeta * (v + kKappa * v * v * v);
  return 0.5f * v * (1.0f + std::tanh(inner));
}
inline float gelu_erf(float v) { return v * 0.5f * (1.0f + std::erf(v * 0.7071067811865476f)); }

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 lanes of silu(gate) * up for bf16 rows: the scalar loop's exp is most of a decode step's MLP
// time outside the matmuls (~10 us of 1,536 elements). exp by Cephes' expf polynomial with the
// scaling by 2^k exact (vscalefps): within 2 float ulps of libm's, which PyTorch's bf16 rounding
// of the result hides but for rare ties (tests/layers/test_cpu_fused_ops.py counts them).
inline __m512 exp512(__m512 x) {
  // Past 89 the scaling overflows to inf and below -104 it underflows to 0, as libm's expf does.
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-104.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}

inline __m512 load_bf16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// Round to bf16 as c10::BFloat16 does (to nearest, ties to even; NaN to the canonical quiet NaN).
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 bf16_round_trip(__m512 v) {  // v rounded to bf16 and widened back: a PyTorch bf16 tensor's value
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

// silu(gate) * up over a bf16 row, 16 elements at a time; returns the elements done (a multiple of
// 16), the caller's scalar loop finishes the rest.
int64_t silu_mul_bf16(const at::BFloat16* g, const at::BFloat16* u, at::BFloat16* o, int64_t n) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 x = load_bf16(g + c);
    const __m512 act = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c),
                        to_bf16(_mm512_mul_ps(bf16_round_trip(act), load_bf16(u + c))));
  }
  return c;
}
#endif

template <typename T, float (*Act)(float)>
void gated_rows(const torch::Tensor& gate_up, int64_t inter, torch::Tensor& out) {
  const int64_t rows = gate_up.size(0);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t sg = gate_up.stride(0);
  at::parallel_for(0, rows, grain_rows(inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * sg;
      const T* u = g + inter;
      T* o = op + r * inter;
      int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (Act == silu) c = silu_mul_bf16(g, u, o, inter);
      }
#endif
      for (; c < inter; ++c)  // act(gate) is a tensor of its own in PyTorch: rounded first
        o[c] = static_cast<T>(round_to<T>(Act(static_cast<float>(g[c]))) * static_cast<float>(u[c]));
    }
  });
}

template <typename T>
void gated_dispatch(const torch::Tensor& gate_up, int64_t inter, int64_t act, torch::Tensor& out) {
  if (act == 0) gated_rows<T, silu>(gate_up, inter, out);
  else if (act == 1) gated_rows<T, gelu_tanh>(gate_up, inter, out);
  else gated_rows<T, gelu_erf>(gate_up, inter, out);
}

torch::Tensor gated_act(const torch::Tensor& gate_up, int64_t intermediate, int64_t act) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) == 2 * intermediate, "gate_up's last dim must be 2 x intermediate");
  TORCH_CHECK(act >= 0 && act <= 2, "activation code must be 0 (silu), 1 (gelu_tanh) or 2 (gelu)");
  auto out = torch::empty({gate_up.size(0), intermediate}, gate_up.options());
  if (gate_up.scalar_type() == torch::kBFloat16) gated_dispatch<at::BFloat16>(gate_up, intermediate, act, out);
  else if (gate_up.scalar_type() == torch::kHalf) gated_dispatch<at::Half>(gate_up, intermediate, act, out);
  else TORCH_CHECK(false, "gate_up must be bfloat16 or float16");
  return out;
}

// ---- rotary ---------------------------------------------------------------------------------------

// x [T, H, D] (any token and head strides, unit stride along D) in T, cos/sin [T, (1,) rotary_dim / 2]
// (any token stride) in C -> a new contiguous [T, H, D] in O = promote(T, C): pairs (first, second)
// rotated as x1 * cos - x2 * sin, x2 * cos + x1 * sin with each product and each sum rounded to O
// (PyTorch's separate ops); channels past rotary_dim copied.
#if defined(__AVX512F__) && defined(__AVX512BW__)
// The neox (half-split) rotation of one bf16 head with a bf16 table, 16 pairs at a time, with the
// scalar loop's roundings (each product and each sum to bf16). Returns the pairs done (a multiple of
// 16); the caller finishes the rest.
int64_t rotate_half_bf16(const at::BFloat16* x, const at::BFloat16* c, const at::BFloat16* s, at::BFloat16* o,
                         int64_t half) {
  int64_t i = 0;
  for (; i + 16 <= half; i += 16) {
    const __m512 x1 = load_bf16(x + i), x2 = load_bf16(x + half + i);
    const __m512 cv = load_bf16(c + i), sv = load_bf16(s + i);
    const __m512 first = _mm512_sub_ps(bf16_round_trip(_mm512_mul_ps(x1, cv)), bf16_round_trip(_mm512_mul_ps(x2, sv)));
    const __m512 second = _mm512_add_ps(bf16_round_trip(_mm512_mul_ps(x2, cv)), bf16_round_trip(_mm512_mul_ps(x1, sv)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), to_bf16(first));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + half + i), to_bf16(second));
  }
  return i;
}
#endif

template <typename T, typename C, typename O>
void rotary_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t rotary_dim,
                 bool interleaved, torch::Tensor& out) {
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2), half = rotary_dim / 2;
  const T* xp = x.data_ptr<T>();
  const C* cp = cos.data_ptr<C>();
  const C* sp = sin.data_ptr<C>();
  O* op = out.data_ptr<O>();
  const int64_t st = x.stride(0), sh = x.stride(1), sc = cos.stride(0), ss = sin.stride(0);
  at::parallel_for(0, tokens, grain_rows(heads * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const C* ct = cp + t * sc;
      const C* snt = sp + t * ss;
      for (int64_t h = 0; h < heads; ++h) {
        const T* xr = xp + t * st + h * sh;
        O* o = op + (t * heads + h) * d;
        int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<C, at::BFloat16>) {
          if (!interleaved) i = rotate_half_bf16(xr, ct, snt, o, half);  // 16 pairs at a time
        }
#endif
        for (; i < half; ++i) {
          const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
          const float x1 = static_cast<float>(xr[a]), x2 = static_cast<float>(xr[b]);
          const float c = static_cast<float>(ct[i]), s = static_cast<float>(snt[i]);
          o[a] = static_cast<O>(round_to<O>(x1 * c) - round_to<O>(x2 * s));
          o[b] = static_cast<O>(round_to<O>(x2 * c) + round_to<O>(x1 * s));
        }
        for (int64_t k = rotary_dim; k < d; ++k) o[k] = static_cast<O>(static_cast<float>(xr[k]));
      }
    }
  });
}

template <typename T>
void rotary_dispatch_table(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                           int64_t rotary_dim, bool interleaved, torch::Tensor& out) {
  if (cos.scalar_type() == torch::kFloat) rotary_rows<T, float, float>(x, cos, sin, rotary_dim, interleaved, out);
  else rotary_rows<T, T, T>(x, cos, sin, rotary_dim, interleaved, out);
}

torch::Tensor rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t rotary_dim,
                     bool interleaved) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1, "x must be a CPU [T, H, D] with unit stride along D");
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= x.size(2), "rotary_dim must be even and at most D");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kBFloat16 || dt == torch::kHalf, "x must be bfloat16 or float16");
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK(t->size(0) == x.size(0) && t->size(-1) == rotary_dim / 2 && t->numel() == x.size(0) * (rotary_dim / 2)
                && t->stride(-1) == 1, "cos/sin must be [T, (1,) rotary_dim / 2] with unit stride along the pairs");
    TORCH_CHECK(t->scalar_type() == dt || t->scalar_type() == torch::kFloat, "cos/sin must be x's dtype or float32");
  }
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(), "cos and sin must share a dtype");
  auto out = torch::empty(x.sizes(), x.options().dtype(c10::promoteTypes(dt, cos.scalar_type()))
                                         .memory_format(c10::MemoryFormat::Contiguous));
  if (dt == torch::kBFloat16) rotary_dispatch_table<at::BFloat16>(x, cos, sin, rotary_dim, interleaved, out);
  else rotary_dispatch_table<at::Half>(x, cos, sin, rotary_dim, interleaved, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(lmserve_fused, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool gemma) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps, bool gemma) -> (Tensor, Tensor)");
  m.def("gated_act(Tensor gate_up, int intermediate, int act) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, int rotary_dim, bool interleaved) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmserve_fused, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("gated_act", &gated_act);
  m.impl("rotary", &rotary);
}
