// Per-element and per-channel maths of the perturbed batch norm, shared by the C++ CPU source and the CUDA
// source so the CPU build exercises exactly the arithmetic the GPU runs.
//
// The perturbed neuron (ANP): y = xh * a + b [+ residual] [then ReLU], with xh = (x - mean) * rstd,
// a = scale * coef_w, b = shift * coef_b. Everything here is fp32; inputs of other types are converted on load.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ANP_HD __host__ __device__ __forceinline__
#else
#define ANP_HD inline
#endif

namespace anp {

// ---- storage types: fp32 and bfloat16 (as its 16 raw bits) ----
ANP_HD float to_float(float v) { return v; }
ANP_HD float to_float(uint16_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
#else
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

template <typename T> ANP_HD T from_float(float v);
template <> ANP_HD float from_float<float>(float v) { return v; }
// Round to nearest even, as torch's bfloat16 conversion does; NaN stays a (quiet) NaN.
template <> ANP_HD uint16_t from_float<uint16_t>(float v) {
#if defined(__CUDA_ARCH__)
  uint32_t u = __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
#endif
  if (v != v) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// ---- statistics ----
// Batch statistics of one (group, channel) from sums of the values SHIFTED by k (a sample of the channel):
// shifting first keeps sum-of-squares from cancelling when |mean| >> std.
struct Stats {
  float mean;
  float rstd;
  float var_unbiased;  // what torch's batch_norm folds into running_var
};
ANP_HD Stats stats_from_shifted_sums(double k, double s1, double s2, int64_t count, double eps) {
  double m = s1 / count;
  double var = s2 / count - m * m;
  if (var < 0) var = 0;
  Stats st;
  st.mean = static_cast<float>(k + m);
  st.rstd = static_cast<float>(1.0 / sqrt(var + eps));
  st.var_unbiased = static_cast<float>(count > 1 ? var * count / (count - 1) : var);
  return st;
}

// ---- forward ----
// a = scale * coef_w and b = shift * coef_b are composed in torch around the op (anp_fast/ops/fused.py).
ANP_HD float forward_value(float x, float mean, float rstd, float a, float b) { return (x - mean) * rstd * a + b; }
// NaN passes through, as torch's relu and its backward let it.
ANP_HD float apply_relu(float y) { return y < 0.f ? 0.f : y; }

// ---- backward ----
// The gradient reaching the affine output: the ReLU mask is read off the saved output y.
ANP_HD float relu_grad(float y, float dy) { return y <= 0.f ? 0.f : dy; }

// Per (group, channel) constants of the input gradient, from the two reductions batch norm backward needs:
// sum_dy = sum(dy'), sum_dyxc = sum(dy' * (x - mean)). The coefficient gradients come from the same two sums:
// d coef_w = scale * rstd * sum_dyxc, d coef_b = shift * sum_dy.
struct GradConsts {
  float a_rstd;     // a * rstd
  float mean_dy;    // sum_dy / M                    (0 in eval mode)
  float proj;       // rstd^2 * sum_dyxc / M         (0 in eval mode)
};
ANP_HD GradConsts grad_consts(float a, float rstd, double sum_dy, double sum_dyxc, int64_t count, bool training) {
  GradConsts g;
  g.a_rstd = a * rstd;
  g.mean_dy = training ? static_cast<float>(sum_dy / count) : 0.f;
  g.proj = training ? static_cast<float>(sum_dyxc / count) * rstd * rstd : 0.f;
  return g;
}
// dx = a * rstd * (dy' - mean(dy') - (x - mean) * rstd^2 * mean(dy' * (x - mean)))
ANP_HD float input_grad(float dy, float x, float mean, const GradConsts& g) {
  return g.a_rstd * (dy - g.mean_dy - (x - mean) * g.proj);
}

}  // namespace anp
