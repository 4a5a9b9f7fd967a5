// C++ CPU kernels of the perturbed batch norm with G coefficient groups, fused residual add and ReLU.
//
// Two layouts, both read as (N, C, S) with S the product of the spatial sizes:
//   rows   (channels_last, or S == 1): element (n, c, s) at ((n * S) + s) * C + c: threads split the rows,
//          the inner loop runs over channels and vectorises;
//   planes (contiguous NCHW): element at (n * C + c) * S + s: threads split the (group, channel) pairs, each
//          scanning its N/G planes for the statistics and again (from cache) to normalise.
// Threads come from ATen's parallel_for, which is OpenMP in torch's CPU builds. Sums are taken in fp32 over
// blocks of rows and folded into fp64 per thread, then over threads in a fixed order.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../layout.h"
#include "../perturbed_norm_math.h"

namespace {

constexpr int64_t kRowBlock = 64;

using anp::Geometry;
using anp::geometry;
using anp::in_layout;
using anp::like_layout;

// ---------------------------------------------------------------- rows layout
// Per-channel shifted sums over rows [r0, r1) of one group, accumulated into d1/d2 (fp64, length C).
template <typename T>
void rows_sums(const T* x, const float* k, int64_t C, int64_t r0, int64_t r1, double* d1, double* d2,
               float* f1, float* f2) {
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    int64_t re = std::min(r1, rb + kRowBlock);
    for (int64_t c = 0; c < C; ++c) { f1[c] = 0.f; f2[c] = 0.f; }
    for (int64_t r = rb; r < re; ++r) {
      const T* xr = x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        float v = anp::to_float(xr[c]) - k[c];
        f1[c] += v;
        f2[c] += v * v;
      }
    }
    for (int64_t c = 0; c < C; ++c) { d1[c] += f1[c]; d2[c] += f2[c]; }
  }
}

// Reduce a per-(group, channel) quantity over the group's rows with all threads; fn(r0, r1, d1, d2, f1, f2)
// accumulates rows [r0, r1). Results in out1/out2 (length C), summed over threads in a fixed order.
template <typename Fn>
void rows_reduce(int64_t rows, int64_t C, Fn fn, double* out1, double* out2) {
  int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + kRowBlock - 1) / kRowBlock));
  std::vector<double> part(2 * C * nt, 0.0);
  int64_t chunk = (rows + nt - 1) / nt;
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> f(2 * C);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t r0 = t * chunk, r1 = std::min(rows, r0 + chunk);
      if (r0 < r1) fn(r0, r1, part.data() + 2 * C * t, part.data() + 2 * C * t + C, f.data(), f.data() + C);
    }
  });
  for (int64_t c = 0; c < C; ++c) { out1[c] = 0.0; out2[c] = 0.0; }
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) { out1[c] += part[2 * C * t + c]; out2[c] += part[2 * C * t + C + c]; }
}

// ---------------------------------------------------------------- forward
template <typename T>
void forward_impl(const Geometry& g, const T* x, const T* res, T* y, const float* a, const float* b,
                  float* mean, float* rstd, float* var_unbiased, bool training, bool relu, double eps) {
  const int64_t C = g.C, M = g.Mg;
  if (g.rows) {
    const int64_t R = g.N / g.G * g.S;  // rows of one group
    if (training) {
      std::vector<float> k(C);
      std::vector<double> s1(C), s2(C);
      for (int64_t gi = 0; gi < g.G; ++gi) {
        const T* xg = x + gi * R * C;
        for (int64_t c = 0; c < C; ++c) k[c] = anp::to_float(xg[c]);
        rows_reduce(R, C, [&](int64_t r0, int64_t r1, double* d1, double* d2, float* f1, float* f2) {
          rows_sums(xg, k.data(), C, r0, r1, d1, d2, f1, f2);
        }, s1.data(), s2.data());
        for (int64_t c = 0; c < C; ++c) {
          anp::Stats st = anp::stats_from_shifted_sums(k[c], s1[c], s2[c], M, eps);
          mean[gi * C + c] = st.mean;
          rstd[gi * C + c] = st.rstd;
          var_unbiased[gi * C + c] = st.var_unbiased;
        }
      }
    }
    at::parallel_for(0, g.N * g.S, kRowBlock, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = (r / R) * C;
        const float *mu = mean + o, *rs = rstd + o, *aa = a + o, *bb = b + o;
        const T* xr = x + r * C;
        T* yr = y + r * C;
        if (res) {
          const T* rr = res + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            float v = anp::forward_value(anp::to_float(xr[c]), mu[c], rs[c], aa[c], bb[c]) + anp::to_float(rr[c]);
            yr[c] = anp::from_float<T>(relu ? anp::apply_relu(v) : v);
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            float v = anp::forward_value(anp::to_float(xr[c]), mu[c], rs[c], aa[c], bb[c]);
            yr[c] = anp::from_float<T>(relu ? anp::apply_relu(v) : v);
          }
        }
      }
    });
    return;
  }
  // planes: one task per (group, channel)
  const int64_t Ng = g.N / g.G, S = g.S;
  at::parallel_for(0, g.G * C, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t gi = p / C, c = p % C;
      if (training) {
        const float k = anp::to_float(x[(gi * Ng * C + c) * S]);
        double s1 = 0, s2 = 0;
        for (int64_t n = gi * Ng; n < (gi + 1) * Ng; ++n) {
          const T* xp = x + (n * C + c) * S;
          float f1 = 0.f, f2 = 0.f;
#pragma omp simd reduction(+ : f1, f2)
          for (int64_t s = 0; s < S; ++s) {
            float v = anp::to_float(xp[s]) - k;
            f1 += v;
            f2 += v * v;
          }
          s1 += f1;
          s2 += f2;
        }
        anp::Stats st = anp::stats_from_shifted_sums(k, s1, s2, M, eps);
        mean[p] = st.mean;
        rstd[p] = st.rstd;
        var_unbiased[p] = st.var_unbiased;
      }
      const float mu = mean[p], rs = rstd[p], aa = a[p], bb = b[p];
      for (int64_t n = gi * Ng; n < (gi + 1) * Ng; ++n) {
        const int64_t off = (n * C + c) * S;
        const T* xp = x + off;
        T* yp = y + off;
        const T* rp = res ? res + off : nullptr;
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) {
          float v = anp::forward_value(anp::to_float(xp[s]), mu, rs, aa, bb);
          if (rp) v += anp::to_float(rp[s]);
          yp[s] = anp::from_float<T>(relu ? anp::apply_relu(v) : v);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- backward
// gbuf: where the ReLU-masked gradient dy' is written when relu (the residual's gradient, or dx itself);
// dx is computed from it in the second pass.
template <typename T>
void backward_impl(const Geometry& g, const T* dy, const T* x, const T* y, T* dx, T* gbuf, const float* a,
                   const float* mean, const float* rstd, double* sum_dy, double* sum_dyxc, bool training,
                   bool relu) {
  const int64_t C = g.C, M = g.Mg;
  std::vector<anp::GradConsts> gc(g.G * C);
  if (g.rows) {
    const int64_t R = g.N / g.G * g.S;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const int64_t o = gi * C;
      const T* dyg = dy + gi * R * C;
      const T* xg = x + gi * R * C;
      const T* yg = relu ? y + gi * R * C : nullptr;
      T* bg = relu ? gbuf + gi * R * C : nullptr;
      rows_reduce(R, C, [&](int64_t r0, int64_t r1, double* d1, double* d2, float* f1, float* f2) {
        const float* mu = mean + o;
        for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
          int64_t re = std::min(r1, rb + kRowBlock);
          for (int64_t c = 0; c < C; ++c) { f1[c] = 0.f; f2[c] = 0.f; }
          for (int64_t r = rb; r < re; ++r) {
            const T *dr = dyg + r * C, *xr = xg + r * C;
            if (relu) {
              const T* yr = yg + r * C;
              T* br = bg + r * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                float d = anp::relu_grad(anp::to_float(yr[c]), anp::to_float(dr[c]));
                br[c] = anp::from_float<T>(d);
                f1[c] += d;
                f2[c] += d * (anp::to_float(xr[c]) - mu[c]);
              }
            } else {
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                float d = anp::to_float(dr[c]);
                f1[c] += d;
                f2[c] += d * (anp::to_float(xr[c]) - mu[c]);
              }
            }
          }
          for (int64_t c = 0; c < C; ++c) { d1[c] += f1[c]; d2[c] += f2[c]; }
        }
      }, sum_dy + o, sum_dyxc + o);
      for (int64_t c = 0; c < C; ++c)
        gc[o + c] = anp::grad_consts(a[o + c], rstd[o + c], sum_dy[o + c], sum_dyxc[o + c], M, training);
    }
    const T* src = relu ? gbuf : dy;
    at::parallel_for(0, g.N * g.S, kRowBlock, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = (r / R) * C;
        const anp::GradConsts* k = gc.data() + o;
        const float* mu = mean + o;
        const T *sr = src + r * C, *xr = x + r * C;
        T* dr = dx + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          dr[c] = anp::from_float<T>(anp::input_grad(anp::to_float(sr[c]), anp::to_float(xr[c]), mu[c], k[c]));
      }
    });
    return;
  }
  const int64_t Ng = g.N / g.G, S = g.S;
  at::parallel_for(0, g.G * C, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t gi = p / C, c = p % C;
      const float mu = mean[p];
      double s1 = 0, s2 = 0;
      for (int64_t n = gi * Ng; n < (gi + 1) * Ng; ++n) {
        const int64_t off = (n * C + c) * S;
        const T *dp = dy + off, *xp = x + off;
        float f1 = 0.f, f2 = 0.f;
        if (relu) {
          const T* yp = y + off;
          T* bp = gbuf + off;
#pragma omp simd reduction(+ : f1, f2)
          for (int64_t s = 0; s < S; ++s) {
            float d = anp::relu_grad(anp::to_float(yp[s]), anp::to_float(dp[s]));
            bp[s] = anp::from_float<T>(d);
            f1 += d;
            f2 += d * (anp::to_float(xp[s]) - mu);
          }
        } else {
#pragma omp simd reduction(+ : f1, f2)
          for (int64_t s = 0; s < S; ++s) {
            float d = anp::to_float(dp[s]);
            f1 += d;
            f2 += d * (anp::to_float(xp[s]) - mu);
          }
        }
        s1 += f1;
        s2 += f2;
      }
      sum_dy[p] = s1;
      sum_dyxc[p] = s2;
      const anp::GradConsts k = anp::grad_consts(a[p], rstd[p], s1, s2, M, training);
      const T* src = relu ? gbuf : dy;
      for (int64_t n = gi * Ng; n < (gi + 1) * Ng; ++n) {
        const int64_t off = (n * C + c) * S;
        const T *sp = src + off, *xp = x + off;
        T* dp = dx + off;
#pragma omp simd
        for (int64_t s = 0; s < S; ++s)
          dp[s] = anp::from_float<T>(anp::input_grad(anp::to_float(sp[s]), anp::to_float(xp[s]), mu, k));
      }
    }
  });
}

void check_common(const at::Tensor& x, const at::Tensor& coef_w) {
  TORCH_CHECK(x.device().is_cpu(), "anp_fast CPU kernel: input must be on the CPU");
  TORCH_CHECK(x.dim() >= 2, "anp_fast CPU kernel: input must be (N, C, ...)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "anp_fast CPU kernel: float32 or bfloat16 input, got ", x.scalar_type());
  TORCH_CHECK(coef_w.dim() == 2 && coef_w.size(1) == x.size(1), "coefficient rows must be (G, C)");
  TORCH_CHECK(x.size(0) % coef_w.size(0) == 0, "batch ", x.size(0), " is not divisible into ", coef_w.size(0),
              " groups");
}

template <typename Fn>
void dispatch_type(at::ScalarType t, Fn fn) {
  if (t == at::kFloat) fn(float{});
  else fn(uint16_t{});
}

template <typename T> T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

}  // namespace

// Returns (y, mean, rstd, var_unbiased), the last three fp32 (G, C). Eval mode (training false) normalises
// with the given mean and rstd (G, C) and returns them.
std::vector<at::Tensor> perturbed_batch_norm_forward(const at::Tensor& x_in, const at::Tensor& a,
                                                     const at::Tensor& b, const c10::optional<at::Tensor>& residual,
                                                     const c10::optional<at::Tensor>& eval_mean,
                                                     const c10::optional<at::Tensor>& eval_rstd, bool relu,
                                                     bool training, double eps) {
  check_common(x_in, a);
  at::Tensor x = in_layout(x_in);
  const int64_t G = a.size(0);
  Geometry g = geometry(x, G);
  at::Tensor y = at::empty_like(x);
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match the input's shape and dtype");
    res = like_layout(*residual, x);
  }
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor mean, rstd;
  at::Tensor var = at::empty({G, g.C}, opts);
  if (training) {
    mean = at::empty({G, g.C}, opts);
    rstd = at::empty({G, g.C}, opts);
  } else {
    TORCH_CHECK(eval_mean.has_value() && eval_rstd.has_value(), "eval mode needs mean and rstd");
    // fresh tensors: an op's output may not alias its input
    mean = at::empty({G, g.C}, opts).copy_(eval_mean->reshape({-1, g.C}).expand({G, g.C}));
    rstd = at::empty({G, g.C}, opts).copy_(eval_rstd->reshape({-1, g.C}).expand({G, g.C}));
    var.zero_();
  }
  at::Tensor af = a.to(at::kFloat).contiguous(), bf = b.to(at::kFloat).contiguous();
  if (x.numel() > 0) {
    dispatch_type(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      forward_impl<T>(g, ptr<T>(x), res.defined() ? ptr<T>(res) : nullptr, ptr<T>(y), af.data_ptr<float>(),
                      bf.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), var.data_ptr<float>(),
                      training, relu, eps);
    });
  }
  return {y, mean, rstd, var};
}

// Returns (dx, dy' (the residual's gradient, when has_residual and relu; else an empty tensor), sum_dy, sum_dyxc),
// the sums fp32 (G, C). y is the forward output (read only for the ReLU mask).
std::vector<at::Tensor> perturbed_batch_norm_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                      const c10::optional<at::Tensor>& y_in, const at::Tensor& a,
                                                      const at::Tensor& mean, const at::Tensor& rstd,
                                                      bool has_residual, bool relu, bool training) {
  check_common(x_in, a);
  TORCH_CHECK(!relu || y_in.has_value(), "the ReLU backward needs the forward output");
  at::Tensor x = in_layout(x_in);
  Geometry g = geometry(x, a.size(0));
  at::Tensor dy = like_layout(dy_in, x);
  at::Tensor y = relu ? like_layout(*y_in, x) : at::Tensor();
  at::Tensor dx = at::empty_like(x);
  // Without ReLU the residual's gradient is dy itself: the caller passes it on (an op output may not alias an input).
  at::Tensor dres = (has_residual && relu) ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor gbuf = relu ? (has_residual ? dres : dx) : at::Tensor();
  auto dopts = x.options().dtype(at::kDouble);
  at::Tensor s1 = at::zeros({g.G, g.C}, dopts), s2 = at::zeros({g.G, g.C}, dopts);
  at::Tensor af = a.to(at::kFloat).contiguous();
  at::Tensor mf = mean.to(at::kFloat).contiguous(), rf = rstd.to(at::kFloat).contiguous();
  if (x.numel() > 0) {
    dispatch_type(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      backward_impl<T>(g, ptr<T>(dy), ptr<T>(x), relu ? ptr<T>(y) : nullptr, ptr<T>(dx),
                       relu ? ptr<T>(gbuf) : nullptr, af.data_ptr<float>(), mf.data_ptr<float>(),
                       rf.data_ptr<float>(), s1.data_ptr<double>(), s2.data_ptr<double>(), training, relu);
    });
  }
  return {dx, dres, s1.to(at::kFloat), s2.to(at::kFloat)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "anp_fast C++ CPU kernels of the perturbed batch norm";
  m.def("perturbed_batch_norm_forward", &perturbed_batch_norm_forward, "forward (see csrc/cpu)");
  m.def("perturbed_batch_norm_backward", &perturbed_batch_norm_backward, "backward (see csrc/cpu)");
}
