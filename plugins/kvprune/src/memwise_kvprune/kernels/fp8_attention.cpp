// One decoding step of attention read straight from FP8 key/value rows, on CPU.
//
// Each KV head's rows hold a token's key and value codes side by side ([T, 2D] bytes) with one
// scale each. A row is decoded through a 256-entry table into a small buffer that stays in L1,
// used at once, and dropped: the cache is read once per step, instead of widened into fp32
// tensors that attention reads again (several passes over memory per step).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

// q [N, G, D] float32 (N = batch x KV heads, G query heads per KV head); rows [N, T, 2D] uint8 codes;
// scales [N, T, 2] bfloat16 (key, value); table [256] float32 (each code widened, as below).
// Returns [N, G, D] float32: the softmax over t of q . k_t * s_k * key_mult, applied to v_t * s_v * value_mult.
torch::Tensor fp8_decode_attention(torch::Tensor q, torch::Tensor rows, torch::Tensor scales, torch::Tensor table,
                                   double key_mult, double value_mult, int64_t shift, int64_t mask) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && rows.dtype() == torch::kUInt8 && scales.dtype() == torch::kBFloat16 &&
              table.dtype() == torch::kFloat32, "fp8_decode_attention: float32 q and table, uint8 rows, bfloat16 scales");
  TORCH_CHECK(q.is_contiguous() && rows.is_contiguous() && scales.is_contiguous() && table.numel() == 256,
              "fp8_decode_attention: contiguous inputs and a 256-entry table");
  const int64_t n = q.size(0), g = q.size(1), d = q.size(2), t = rows.size(1);
  TORCH_CHECK(rows.size(0) == n && rows.size(2) == 2 * d && scales.size(0) == n && scales.size(1) == t,
              "fp8_decode_attention: shapes do not match");
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const uint8_t* rp = rows.data_ptr<uint8_t>();
  const at::BFloat16* sp = scales.data_ptr<at::BFloat16>();
  const float kmult = static_cast<float>(key_mult), vmult = static_cast<float>(value_mult);
  const float* lut = table.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(g * t), row(d);
    for (int64_t h = begin; h < end; ++h) {
      const float* qh = qp + h * g * d;
      const uint8_t* rh = rp + h * t * 2 * d;
      const at::BFloat16* sh = sp + h * t * 2;
      float* oh = op + h * g * d;
      for (int64_t j = 0; j < t; ++j) {  // scores: decode the key once, dot it with every query head
        const uint8_t* code = rh + j * 2 * d;
        widen_row(code, row.data(), d, lut, shift, static_cast<int16_t>(mask));
        for (int64_t k = 0; k < g; ++k) {
          const float* qk = qh + k * d;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < d; ++i) acc += qk[i] * row[i];
          score[k * t + j] = acc * (static_cast<float>(sh[2 * j]) * kmult);
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
        for (int64_t j = 0; j < t; ++j) s[j] *= inv * (static_cast<float>(sh[2 * j + 1]) * vmult);
      }
      for (int64_t j = 0; j < t; ++j) {  // output: decode the value once, add it to every query head
        const uint8_t* code = rh + j * 2 * d + d;
        widen_row(code, row.data(), d, lut, shift, static_cast<int16_t>(mask));
        for (int64_t k = 0; k < g; ++k) {
          const float w = score[k * t + j];
          float* ok = oh + k * d;
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
