// One decoding step of attention read straight from FP8 key/value rows, on CPU.
//
// Each token's key and value rows (FP8 codes, one scale each) are decoded into a small buffer that
// stays in L1, used at once, and dropped: the cache is read once per step, instead of widened into
// fp32 tensors that attention reads again (several passes over memory per step).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

// Codes -> float16 bit patterns -> float32, exactly as the table holds them: a code read as int8,
// shifted left (7 for E4M3, 8 for E5M2) and masked (E4M3 clears the sign's copy in bit 14).
static inline void widen_row(const uint8_t* code, float* row, int64_t d, const float* lut, int shift, int16_t mask) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  const __m128i count = _mm_cvtsi32_si128(shift);
  const __m256i keep = _mm256_set1_epi16(mask);
  for (; i + 16 <= d; i += 16) {
    __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(code + i)));
    w = _mm256_and_si256(_mm256_sll_epi16(w, count), keep);
    _mm256_storeu_ps(row + i, _mm256_cvtph_ps(_mm256_castsi256_si128(w)));
    _mm256_storeu_ps(row + i + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(w, 1)));
  }
#endif
  for (; i < d; ++i) row[i] = lut[code[i]];
}

// N = batch x KV heads, G query heads per KV head, D head dim, Dk kept key channels (D without ThinK).
// q_kept [N, G, Dk] and q [N, G, D] float32; keys [N, Tp, Dk] uint8 codes with key_scales [N, Tp] bfloat16;
// window [N, Tw, D] float32 (ThinK's full-width keys, Tw may be 0); values [N, Tp + Tw, D] uint8 codes with
// value_scales [N, Tp + Tw] bfloat16; table [256] float32 (each code widened as widen_row does).
// Code and scale tensors may be strided views (a key and a value sharing one row); their last dim is dense.
// Returns [N, G, D] float32: the softmax over tokens of the scores (q_kept . k_t * s_t * key_mult for stored
// keys, q . w_t * window_mult for the window's), applied to v_t * s_t * value_mult.
torch::Tensor fp8_decode_attention(torch::Tensor q_kept, torch::Tensor q, torch::Tensor keys, torch::Tensor key_scales,
                                   torch::Tensor window, torch::Tensor values, torch::Tensor value_scales,
                                   torch::Tensor table, double key_mult, double window_mult, double value_mult,
                                   int64_t shift, int64_t mask) {
  TORCH_CHECK(q_kept.dtype() == torch::kFloat32 && q.dtype() == torch::kFloat32 && window.dtype() == torch::kFloat32 &&
              table.dtype() == torch::kFloat32, "fp8_decode_attention: float32 queries, window and table");
  TORCH_CHECK(keys.dtype() == torch::kUInt8 && values.dtype() == torch::kUInt8 &&
              key_scales.dtype() == torch::kBFloat16 && value_scales.dtype() == torch::kBFloat16,
              "fp8_decode_attention: uint8 codes and bfloat16 scales");
  TORCH_CHECK(q_kept.is_contiguous() && q.is_contiguous() && window.is_contiguous() && table.numel() == 256 &&
              keys.stride(2) == 1 && values.stride(2) == 1, "fp8_decode_attention: dense rows");
  const int64_t n = q.size(0), g = q.size(1), d = q.size(2), dk = q_kept.size(2);
  const int64_t tp = keys.size(1), tw = window.size(1), t = values.size(1);
  TORCH_CHECK(keys.size(2) == dk && values.size(2) == d && window.size(2) == d && t == tp + tw &&
              key_scales.size(1) == tp && value_scales.size(1) == t, "fp8_decode_attention: shapes do not match");
  auto out = torch::zeros_like(q);
  const float* qkp = q_kept.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const uint8_t* kp = keys.data_ptr<uint8_t>();
  const uint8_t* vp = values.data_ptr<uint8_t>();
  const at::BFloat16* ksp = key_scales.data_ptr<at::BFloat16>();
  const at::BFloat16* vsp = value_scales.data_ptr<at::BFloat16>();
  const float* wp = window.data_ptr<float>();
  const float* lut = table.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ks0 = keys.stride(0), ks1 = keys.stride(1), vs0 = values.stride(0), vs1 = values.stride(1);
  const int64_t kss0 = key_scales.stride(0), kss1 = key_scales.stride(1);
  const int64_t vss0 = value_scales.stride(0), vss1 = value_scales.stride(1);
  const float kmult = static_cast<float>(key_mult), wmult = static_cast<float>(window_mult);
  const float vmult = static_cast<float>(value_mult);
  const int16_t keep = static_cast<int16_t>(mask);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(g * t), row(std::max(d, dk));
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t j = 0; j < tp; ++j) {  // stored keys: decode once, dot with every query head
        widen_row(kp + h * ks0 + j * ks1, row.data(), dk, lut, shift, keep);
        const float s = static_cast<float>(ksp[h * kss0 + j * kss1]) * kmult;
        for (int64_t k = 0; k < g; ++k) {
          const float* qk = qkp + (h * g + k) * dk;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < dk; ++i) acc += qk[i] * row[i];
          score[k * t + j] = acc * s;
        }
      }
      for (int64_t j = 0; j < tw; ++j) {  // the full-width window
        const float* w = wp + (h * tw + j) * d;
        for (int64_t k = 0; k < g; ++k) {
          const float* qk = qp + (h * g + k) * d;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < d; ++i) acc += qk[i] * w[i];
          score[k * t + tp + j] = acc * wmult;
        }
      }
      for (int64_t k = 0; k < g; ++k) {  // softmax, with the value scale folded into the weights
        float* s = score.data() + k * t;
        const float m = *std::max_element(s, s + t);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < t; ++j) {
          s[j] = std::exp(s[j] - m);
          sum += s[j];
        }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < t; ++j) s[j] *= inv * (static_cast<float>(vsp[h * vss0 + j * vss1]) * vmult);
      }
      for (int64_t j = 0; j < t; ++j) {  // output: decode the value once, add it to every query head
        widen_row(vp + h * vs0 + j * vs1, row.data(), d, lut, shift, keep);
        for (int64_t k = 0; k < g; ++k) {
          const float w = score[k * t + j];
          float* ok = op + (h * g + k) * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) ok[i] += w * row[i];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp8_decode_attention", &fp8_decode_attention, "one decoding step of attention on FP8 key/value rows");
}
