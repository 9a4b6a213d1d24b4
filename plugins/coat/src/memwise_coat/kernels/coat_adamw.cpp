// One CoatAdamW step for one parameter on CPU: both FP8 moments decoded, the AdamW update, both
// moments encoded again. Up to BLOCK groups are taken at a time: per group, one loop decodes both moments
// and one does the update (finding each new moment's largest and smallest non-zero magnitude on the
// way); then the block's per-group codec parameters are computed together, and one loop per group
// encodes both moments. Each group's data sits in L1 throughout.
//
// The math is memwise_coat.update.fp8_step_reference's, except for these things: log2 and exp2 are
// the polynomials below (within about an ulp of torch's; encoding's are shorter, as its result is
// rounded onto FP8); decoding a group whose expansion k is j / 16 (4 <= j < 1024, as k is set) reads
// 2^(log2|code| / k) from a table made once per k and multiplies it by the group's 2^(log2 s / k) c,
// and other groups read log2|code * scale| as log2|code| (a 256-entry table) + log2(scale) and take
// one exp2 per element; and encoding folds the scale into the exponent: |y| = 2^(k log2|x / c|) grows
// with |x| (k > 0), so the group's largest |y| is the one of its largest |x|, known before the loop,
// and each element's |r| = |y| / s is computed as 2^(k log2(|x| / c) - log2 s), with 1 / c and log2 s
// once per group. A code may therefore differ from the reference's by one FP8 step where |r| lies
// within a few ulps of a rounding boundary. Zeros, groups of zeros and groups of one magnitude
// (scale 1, every code 1) are coded as the reference codes them. Encoding an element costs one log2
// and one exp2. Rounding onto FP8 is done on the bits, half to even, as torch's cast rounds.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// log2 of a positive finite float (subnormals included): x = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log2 m = 2 log2(e) atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^(2 TERMS - 1):
// 6 terms are within about an ulp, 4 within 4e-8 (enough where the result is rounded onto FP8).
template <int TERMS>
inline float log2_series(float x) {
  const bool sub = x < 1.17549435e-38f;
  x = sub ? x * 8388608.0f : x;  // 2^23
  const uint32_t u = bits_of(x);
  int e = static_cast<int>(u >> 23) - 127 - (sub ? 23 : 0);
  float m = float_of((u & 0x007FFFFFu) | 0x3F800000u);
  const bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  e += high ? 1 : 0;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float q = 1.0f / (2 * TERMS - 1);
  for (int j = TERMS - 2; j >= 1; --j) q = std::fma(q, s2, 1.0f / (2 * j + 1));
  const float t = s * 2.88539008f;  // 2 log2(e)
  return static_cast<float>(e) + std::fma(t, s2 * q, t);
}

inline float log2_poly(float x) { return log2_series<6>(x); }
inline float log2_coarse(float x) { return log2_series<4>(x); }

// a polynomial in f by Horner's rule, its coefficients from the highest degree down (a call per
// coefficient, all inlined: a loop over an array here stops the element loops from vectorising)
inline float horner(float, float c) { return c; }
template <typename... Rest>
inline float horner(float f, float c, float next, Rest... rest) {
  return horner(f, std::fma(c, f, next), rest...);
}

// 2^f for |f| <= 1/2, interpolated at the Chebyshev nodes: degree 6, relative error 2.5e-9
inline float exp2_fraction(float f) {
  return horner(f, 1.54614447e-4f, 1.34004282e-3f, 9.61805668e-3f, 5.55032723e-2f, 2.40226509e-1f,
                6.93147207e-1f, 1.0f);
}

// the same to encoding's precision: degree 5, relative error 1.0e-7, where an FP8 step is 2^-3
inline float exp2_fraction_coarse(float f) {
  return horner(f, 1.33908634e-3f, 9.67603192e-3f, 5.55035711e-2f, 2.40221075e-1f, 6.93147188e-1f, 1.00000008f);
}

// 2^x within about an ulp, 0 below the subnormals and inf above the float range: x = n + f with
// |f| <= 1/2, 2^f by exp2_fraction, times 2^n as two powers of two (so subnormal
// results round once).
inline float exp2_poly(float x) {
  x = x < -151.0f ? -151.0f : (x > 129.0f ? 129.0f : x);
  const float n = (x + 12582912.0f) - 12582912.0f;  // round to nearest integer (1.5 * 2^23)
  const float p = exp2_fraction(x - n);
  const int ni = static_cast<int>(n);
  const int n1 = ni >> 1;
  const int n2 = ni - n1;
  return p * float_of(static_cast<uint32_t>(n1 + 127) << 23) * float_of(static_cast<uint32_t>(n2 + 127) << 23);
}

// encoding's exp2: x in [-126, 127] (a normal result), to FP8's precision (exp2_fraction_coarse), with
// one scaling by 2^n; x is clamped there, so the exponent arithmetic stays in range.
inline float exp2_normal(float x) {
  x = x < -126.0f ? -126.0f : (x > 127.0f ? 127.0f : x);
  const float n = (x + 12582912.0f) - 12582912.0f;
  const float p = exp2_fraction_coarse(x - n);
  return p * float_of(static_cast<uint32_t>(static_cast<int>(n) + 127) << 23);
}

struct Format {
  int mantissa;       // M
  int bias;           // exponent bias
  float max_value;    // Q
  float smallest;     // the smallest positive (subnormal) value
  float log_range;    // log2(Q^2 / 2), as a float32 (torch computes k in float32)
  float min_normal;   // 2^(1 - bias)
  float magic;        // 2^(24 - bias - M): adding it rounds a subnormal onto the grid, half to even
  const float* value; // [256] each code's value
  const float* log2mag;  // [256] log2 of each code's magnitude (0 for zeros)
};

Format make_format(const std::vector<double>& f, const torch::Tensor& table) {
  // f: mantissa bits, min normal exponent, max value, log range, smallest
  Format out;
  out.mantissa = static_cast<int>(f[0]);
  out.bias = 1 - static_cast<int>(f[1]);
  out.max_value = static_cast<float>(f[2]);
  out.log_range = static_cast<float>(f[3]);
  out.smallest = static_cast<float>(f[4]);
  out.min_normal = std::ldexp(1.0f, 1 - out.bias);
  out.magic = std::ldexp(1.0f, 24 - out.bias - out.mantissa);
  out.value = table.data_ptr<float>();
  out.log2mag = out.value + 256;
  return out;
}

// |r| in [0, Q] on the FP8 grid (the magnitude bits of its code), half to even: ``shift`` = 23 - M,
// ``bias`` = (127 - the format's bias) << M, ``magic`` = 2^(24 - bias - M) for the subnormals.
inline uint32_t magnitude_code(float r, int shift, uint32_t bias, float min_normal, float magic) {
  const uint32_t u = bits_of(r);
  const uint32_t rounded = u + ((1u << (shift - 1)) - 1u) + ((u >> shift) & 1u);
  const uint32_t normal = (rounded >> shift) - bias;
  const uint32_t sub = bits_of(r + magic) - bits_of(magic);
  return r < min_normal ? sub : normal;
}

struct Meta {
  float* scale;
  float* expand;
  float* centre;
};

// Codec parameters of up to BLOCK groups for encoding, from each group's largest and smallest non-zero
// magnitude, as quantization.quantize_groups sets them: per element |r| = 2^(k log2(|x| / c) - log2 s)
// with expansion, |x| / s without.
constexpr int64_t BLOCK = 16;            // at most this many groups handled together
constexpr int64_t BLOCK_ELEMENTS = 2048;  // and about this many elements (both moments: 16 KiB of L1)

struct Encoders {
  float big[BLOCK], small[BLOCK];  // in
  float scale[BLOCK], k[BLOCK], centre[BLOCK], inv_centre[BLOCK], log2_scale[BLOCK];  // out

  void compute(int64_t nb, const Format& f, bool expansion, float min_expansion) {
    const float q = f.max_value, log_range = f.log_range;
    float log_ratio[BLOCK];
    for (int64_t j = 0; j < nb; ++j) {  // correctly rounded, as k must be the reference's
      const bool spread = big[j] > 0.0f && small[j] != big[j];
      log_ratio[j] = spread ? static_cast<float>(std::log2(static_cast<double>(big[j] / small[j]))) : 0.0f;
    }
    if (!expansion) {
      for (int64_t j = 0; j < nb; ++j) {
        const float hi = big[j];
        scale[j] = hi > 0.0f ? (small[j] == hi ? hi : hi / q) : 1.0f;
        k[j] = centre[j] = inv_centre[j] = 1.0f;
        log2_scale[j] = 0.0f;
      }
      return;
    }
#pragma omp simd
    for (int64_t j = 0; j < nb; ++j) {
      const float hi = big[j], lo = small[j], log_r = log_ratio[j];
      const bool nonzero = hi > 0.0f;
      const bool flat = lo == hi;
      const bool spread = nonzero && !flat;
      float kj = log_r > 0.0f ? std::floor(log_range / log_r * 16.0f) / 16.0f : 1.0f;
      kj = kj < min_expansion ? min_expansion : kj;
      kj = nonzero ? kj : 1.0f;
      float cj = flat ? hi : std::sqrt(hi) * std::sqrt(lo);
      cj = nonzero ? cj : 1.0f;
      const float ic = 1.0f / cj;
      // the group's largest |y| = 2^(k log2|x / c|) is big's (k > 0)
      const float top = exp2_poly(log2_poly(spread ? hi * ic : 1.0f) * kj);
      const float sj = spread ? top / q : 1.0f;
      k[j] = kj;
      centre[j] = cj;
      inv_centre[j] = ic;
      scale[j] = sj;
      log2_scale[j] = spread ? log2_poly(sj) : 0.0f;
    }
  }
};

// The FP8 code of one element of magnitude ``r`` (already |x| / s or its expansion) and sign bit of x.
struct Rounder {
  float q, least, min_normal, magic;
  int shift;
  uint32_t bias;
  explicit Rounder(const Format& f)
      : q(f.max_value), least(f.smallest), min_normal(f.min_normal), magic(f.magic), shift(23 - f.mantissa),
        bias(static_cast<uint32_t>(127 - f.bias) << f.mantissa) {}
};

inline uint8_t round_code(float r, bool zero, uint32_t sign, const Rounder& o, bool keep_zero_sign) {
  r = r < o.least ? o.least : (r > o.q ? o.q : r);
  const uint32_t mag = zero ? 0u : magnitude_code(r, o.shift, o.bias, o.min_normal, o.magic);
  // expansion: sign(x) |y| is +0 for a zero; the plain codec keeps a zero's sign
  return static_cast<uint8_t>((zero && !keep_zero_sign) ? 0u : (sign | mag));
}

// 2^(log2|code| / k) for each magnitude code (codes 0 to 127), one table per expansion k = j / 16 for
// j in [4, 1024), each made in double the first time a group needs it. A group with such a k is then
// decoded by a lookup and one multiply by its factor 2^(log2 s / k) c, instead of an exp2 per element.
// Other k, and a group whose values would leave float's normal range, take decode_expanded.
struct PowerTables {
  static constexpr int first = 4, last = 1024;
  const float* value;  // each code's value
  std::vector<int32_t> row = std::vector<int32_t>(last, -1);
  std::vector<float> data;       // 128 per table
  std::vector<float> least, most;  // each table's smallest and largest entry of a non-zero code

  explicit PowerTables(const float* code_values) : value(code_values) {}

  // the table and factor for a group, or nullptr where this group must take decode_expanded
  const float* find(float k, float scale, float centre, float* factor) {
    const float j = k * 16.0f;
    if (!(j >= first && j < last) || j != std::floor(j)) return nullptr;
    const int ji = static_cast<int>(j);
    if (row[ji] < 0) {
      row[ji] = static_cast<int32_t>(least.size());
      const double kd = static_cast<double>(k);
      float lo = std::numeric_limits<float>::infinity(), hi = 0.0f;
      for (int c = 0; c < 128; ++c) {
        const double a = std::fabs(static_cast<double>(value[c]));
        const float t = a > 0.0 ? static_cast<float>(std::exp2(std::log2(a) / kd)) : 0.0f;
        data.push_back(t);
        if (a > 0.0) {
          lo = std::min(lo, t);
          hi = std::max(hi, t);
        }
      }
      least.push_back(lo);
      most.push_back(hi);
    }
    const int r = row[ji];
    const double f = std::exp2(std::log2(static_cast<double>(scale)) / static_cast<double>(k)) * centre;
    if (!(f * least[r] >= std::numeric_limits<float>::min() && f * most[r] <= std::numeric_limits<float>::max())) {
      return nullptr;
    }
    *factor = static_cast<float>(f);
    return data.data() + 128 * static_cast<int64_t>(r);
  }
};

// one moment of one group, decoded by its power table
inline void decode_table(const uint8_t* codes, float* x, int64_t n, const float* table, float factor) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t c = codes[i];
    const float a = table[c & 0x7Fu] * factor;
    x[i] = (c & 0x7Fu) ? ((c & 0x80u) ? -a : a) : 0.0f;
  }
}

// one moment of one group, decoded: sign(ys) 2^(log2|ys| / k) c (one loop per moment keeps the
// constants in registers)
inline void decode_expanded(const uint8_t* codes, float* x, int64_t n, const float* log2mag, float log2_scale,
                            float k, float centre) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t c = codes[i];
    const float a = exp2_poly((log2mag[c] + log2_scale) / k) * centre;
    x[i] = (c & 0x7Fu) ? ((c & 0x80u) ? -a : a) : 0.0f;
  }
}

// one moment of one group, decoded by its power table where it has one, else by an exp2 per element
inline void decode_group(PowerTables& tables, const uint8_t* codes, float* x, int64_t n, const float* log2mag,
                         float log2_scale, float k, float scale, float centre) {
  float factor;
  if (const float* t = tables.find(k, scale, centre, &factor)) {
    decode_table(codes, x, n, t, factor);
  } else {
    decode_expanded(codes, x, n, log2mag, log2_scale, k, centre);
  }
}

// one moment of one group, encoded: |r| = 2^(k log2(|x| / c) - log2 s)
inline void encode_expanded(const float* x, uint8_t* codes, int64_t n, float inv_centre, float k, float log2_scale,
                            const Rounder& o) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    const bool zero = a == 0.0f;
    // log2 of a zero is never used: its code is +0
    const float r = exp2_normal(log2_coarse(zero ? 1.0f : a * inv_centre) * k - log2_scale);
    codes[i] = round_code(r, zero, bits_of(x[i]) >> 31 << 7, o, false);
  }
}

struct Step {
  float decay, weight, beta2, one_minus_beta2, eps, neg_step_size, bias_correction2_sqrt;
  bool small_weight;  // torch's lerp: start + w (end - start) for |w| < 1/2, else end + (w - 1)(end - start)
};

// torch.optim.AdamW's update of p[0, n) with gradient g and the decoded moments m and v (updated in
// place); ``extremes``: each new moment's largest and smallest non-zero magnitude, for its encoding.
template <typename P, typename G>
inline void update(P* p, const G* g, float* m, float* v, int64_t n, const Step& s, float* extremes) {
  // loop invariants as locals: the vectoriser does not read them through references
  const float decay = s.decay, beta2 = s.beta2, one_minus_beta2 = s.one_minus_beta2, eps = s.eps;
  const float neg_step_size = s.neg_step_size, bc2 = s.bias_correction2_sqrt;
  const float weight = s.small_weight ? s.weight : s.weight - 1.0f;
  // lerp's start (m) or end (g), picked on the bits: a branch here is moved out of the loop by the
  // compiler, which then vectorises only one of the two copies
  const uint32_t start_mask = s.small_weight ? 0xFFFFFFFFu : 0u;
  const float inf = std::numeric_limits<float>::infinity();
  float mbig = 0.0f, msmall = inf, vbig = 0.0f, vsmall = inf;
#pragma omp simd reduction(max : mbig, vbig) reduction(min : msmall, vsmall)
  for (int64_t i = 0; i < n; ++i) {
    const float gi = static_cast<float>(g[i]);
    float pi = static_cast<float>(p[i]) * decay;
    // torch's vectorised lerp and addcmul round as these fused multiply-adds do
    const float base = float_of((bits_of(m[i]) & start_mask) | (bits_of(gi) & ~start_mask));
    const float mi = std::fma(weight, gi - m[i], base);
    const float vi = std::fma(one_minus_beta2 * gi, gi, v[i] * beta2);
    const float denom = std::sqrt(vi) / bc2 + eps;
    pi = pi + (neg_step_size * mi) / denom;
    p[i] = static_cast<P>(pi);
    m[i] = mi;
    v[i] = vi;
    const float am = std::fabs(mi), av = std::fabs(vi);
    mbig = am > mbig ? am : mbig;
    vbig = av > vbig ? av : vbig;
    const float nm = am > 0.0f ? am : inf, nv = av > 0.0f ? av : inf;
    msmall = nm < msmall ? nm : msmall;
    vsmall = nv < vsmall ? nv : vsmall;
  }
  extremes[0] = mbig;
  extremes[1] = msmall;
  extremes[2] = vbig;
  extremes[3] = vsmall;
}

template <typename P, typename G>
void run(P* p, const G* grad, uint8_t* mq, Meta mm, uint8_t* vq, Meta vm, int64_t numel, int64_t group,
         bool expansion, float min_expansion, const Step& s, const Format& fm, const Format& fv) {
  const int64_t groups = (numel + group - 1) / group;
  // a block of groups at a time: their per-group scalar work (log2 of the scales, the new encoders) is
  // independent from group to group, so it overlaps instead of stalling between the vector loops
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(BLOCK, BLOCK_ELEMENTS / group));
  at::parallel_for(0, groups, block, [&](int64_t begin, int64_t end) {
    // loop invariants as locals of the worker: the vectoriser does not read them through references
    const float *m_log2 = fm.log2mag, *v_log2 = fv.log2mag, *m_value = fm.value, *v_value = fv.value;
    const Rounder om(fm), ov(fv);
    float extremes[4];
    std::vector<float> buffer(2 * block * group);
    float* mb = buffer.data();
    float* vb = mb + block * group;
    float mls_b[BLOCK], vls_b[BLOCK];
    PowerTables mt(fm.value), vt(fv.value);
    Encoders em, ev;
    for (int64_t g0 = begin; g0 < end; g0 += block) {
      const int64_t nb = std::min(block, end - g0);
      for (int64_t j = 0; j < nb; ++j) {
        mls_b[j] = static_cast<float>(std::log2(static_cast<double>(mm.scale[g0 + j])));
        vls_b[j] = static_cast<float>(std::log2(static_cast<double>(vm.scale[g0 + j])));
      }
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t g = g0 + j;
        const int64_t start = g * group;
        const int64_t n = std::min(group, numel - start);
        float* m = mb + j * group;
        float* v = vb + j * group;
        P* pg = p + start;
        const G* gg = grad + start;
        const uint8_t* mc = mq + start;
        const uint8_t* vc = vq + start;
        const float ms = mm.scale[g], vs = vm.scale[g];
        const float mk = expansion ? mm.expand[g] : 1.0f, vk = expansion ? vm.expand[g] : 1.0f;
        const float mcen = expansion ? mm.centre[g] : 1.0f, vcen = expansion ? vm.centre[g] : 1.0f;
        const float mls = mls_b[j], vls = vls_b[j];
        if (expansion) {  // sign(ys) 2^(log2|ys| / k) c
          decode_group(mt, mc, m, n, m_log2, mls, mk, ms, mcen);
          decode_group(vt, vc, v, n, v_log2, vls, vk, vs, vcen);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            m[i] = m_value[mc[i]] * ms;
            v[i] = v_value[vc[i]] * vs;
          }
        }
        update(pg, gg, m, v, n, s, extremes);
        em.big[j] = extremes[0];
        em.small[j] = extremes[1];
        ev.big[j] = extremes[2];
        ev.small[j] = extremes[3];
      }
      em.compute(nb, fm, expansion, min_expansion);
      ev.compute(nb, fv, expansion, min_expansion);
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t g = g0 + j;
        const int64_t start = g * group;
        const int64_t n = std::min(group, numel - start);
        const float* m = mb + j * group;
        const float* v = vb + j * group;
        uint8_t* mc = mq + start;
        uint8_t* vc = vq + start;
        if (expansion) {
          const float mic = em.inv_centre[j], mke = em.k[j], mlsn = em.log2_scale[j];
          const float vic = ev.inv_centre[j], vke = ev.k[j], vlsn = ev.log2_scale[j];
          encode_expanded(m, mc, n, mic, mke, mlsn, om);
          encode_expanded(v, vc, n, vic, vke, vlsn, ov);
        } else {
          const float msc = em.scale[j], vsc = ev.scale[j];
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const float rm = std::fabs(m[i]) / msc, rv = std::fabs(v[i]) / vsc;
            mc[i] = round_code(rm, rm == 0.0f, bits_of(m[i]) >> 31 << 7, om, true);
            vc[i] = round_code(rv, rv == 0.0f, bits_of(v[i]) >> 31 << 7, ov, true);
          }
        }
        mm.scale[g] = em.scale[j];
        vm.scale[g] = ev.scale[j];
        if (expansion) {
          mm.expand[g] = em.k[j];
          mm.centre[g] = em.centre[j];
          vm.expand[g] = ev.k[j];
          vm.centre[g] = ev.centre[j];
        }
      }
    }
  });
}

template <typename P>
void run_grad(P* p, const torch::Tensor& grad, uint8_t* mq, Meta mm, uint8_t* vq, Meta vm, int64_t numel,
              int64_t group, bool expansion, float min_expansion, const Step& s, const Format& fm, const Format& fv) {
  switch (grad.scalar_type()) {
    case torch::kFloat32:
      return run(p, grad.data_ptr<float>(), mq, mm, vq, vm, numel, group, expansion, min_expansion, s, fm, fv);
    case torch::kBFloat16:
      return run(p, grad.data_ptr<at::BFloat16>(), mq, mm, vq, vm, numel, group, expansion, min_expansion, s, fm, fv);
    case torch::kFloat16:
      return run(p, grad.data_ptr<at::Half>(), mq, mm, vq, vm, numel, group, expansion, min_expansion, s, fm, fv);
    default:
      TORCH_CHECK(false, "coat_adamw_step: gradients in float32, bfloat16 or float16, not ", grad.scalar_type());
  }
}

Meta meta_of(const torch::Tensor& scale, const torch::Tensor& expand, const torch::Tensor& centre, int64_t groups) {
  for (const auto* t : {&scale, &expand, &centre}) {
    TORCH_CHECK(t->dtype() == torch::kFloat32 && t->is_contiguous() && t->numel() == groups,
                "coat_adamw_step: per-group metadata must be contiguous float32 with one value per group");
  }
  return {scale.data_ptr<float>(), expand.data_ptr<float>(), centre.data_ptr<float>()};
}

}  // namespace

// p: the parameter (float32, bfloat16 or float16, contiguous), updated in place; grad: its gradient
// (contiguous). m_codes / v_codes: the moments' FP8 codes read as uint8 (one per element), with their
// per-group scale, expand and centre (without expansion, pass scale three times). m_table / v_table:
// [2, 256] float32, each code's value and the log2 of its magnitude. scalars: decay, lerp weight,
// beta2, 1 - beta2, eps, -step size, sqrt of the second bias correction. m_format / v_format:
// mantissa bits, min normal exponent, max value, log2(Q^2 / 2), smallest value.
void coat_adamw_step(torch::Tensor p, torch::Tensor grad, torch::Tensor m_codes, torch::Tensor m_scale,
                     torch::Tensor m_expand, torch::Tensor m_centre, torch::Tensor v_codes, torch::Tensor v_scale,
                     torch::Tensor v_expand, torch::Tensor v_centre, torch::Tensor m_table, torch::Tensor v_table,
                     int64_t group, bool expansion, double min_expansion, std::vector<double> scalars,
                     std::vector<double> m_format, std::vector<double> v_format) {
  const int64_t numel = p.numel();
  TORCH_CHECK(p.is_contiguous() && grad.is_contiguous() && grad.numel() == numel,
              "coat_adamw_step: contiguous parameter and gradient of the same size");
  TORCH_CHECK(m_codes.dtype() == torch::kUInt8 && v_codes.dtype() == torch::kUInt8 && m_codes.is_contiguous() &&
              v_codes.is_contiguous() && m_codes.numel() == numel && v_codes.numel() == numel,
              "coat_adamw_step: contiguous uint8 codes, one per element");
  TORCH_CHECK(m_table.dtype() == torch::kFloat32 && v_table.dtype() == torch::kFloat32 && m_table.numel() == 512 &&
              v_table.numel() == 512 && m_table.is_contiguous() && v_table.is_contiguous(),
              "coat_adamw_step: [2, 256] float32 code tables");
  TORCH_CHECK(group > 0 && scalars.size() == 7 && m_format.size() == 5 && v_format.size() == 5,
              "coat_adamw_step: group size, 7 scalars and 5 numbers per format");
  const int64_t groups = (numel + group - 1) / group;
  const Meta mm = meta_of(m_scale, m_expand, m_centre, groups);
  const Meta vm = meta_of(v_scale, v_expand, v_centre, groups);
  Step s;
  s.decay = static_cast<float>(scalars[0]);
  s.weight = static_cast<float>(scalars[1]);
  s.small_weight = std::fabs(s.weight) < 0.5f;
  s.beta2 = static_cast<float>(scalars[2]);
  s.one_minus_beta2 = static_cast<float>(scalars[3]);
  s.eps = static_cast<float>(scalars[4]);
  s.neg_step_size = static_cast<float>(scalars[5]);
  s.bias_correction2_sqrt = static_cast<float>(scalars[6]);
  const Format fm = make_format(m_format, m_table), fv = make_format(v_format, v_table);
  uint8_t* mq = m_codes.data_ptr<uint8_t>();
  uint8_t* vq = v_codes.data_ptr<uint8_t>();
  const float kmin = static_cast<float>(min_expansion);
  switch (p.scalar_type()) {
    case torch::kFloat32:
      return run_grad(p.data_ptr<float>(), grad, mq, mm, vq, vm, numel, group, expansion, kmin, s, fm, fv);
    case torch::kBFloat16:
      return run_grad(p.data_ptr<at::BFloat16>(), grad, mq, mm, vq, vm, numel, group, expansion, kmin, s, fm, fv);
    case torch::kFloat16:
      return run_grad(p.data_ptr<at::Half>(), grad, mq, mm, vq, vm, numel, group, expansion, kmin, s, fm, fv);
    default:
      TORCH_CHECK(false, "coat_adamw_step: parameters in float32, bfloat16 or float16, not ", p.scalar_type());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("coat_adamw_step", &coat_adamw_step, "One fused CoatAdamW step for one parameter (FP8 moments, in place)");
}
