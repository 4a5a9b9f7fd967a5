// CUDA kernels of the perturbed batch norm with G coefficient groups, fused residual add and ReLU; the same
// contract and the same per-element maths (../perturbed_norm_math.h) as the C++ CPU kernels.
//
// Forward: a split reduction (partial shifted sums per (group, split, channel)), a finalize kernel (fp64
// combine into mean / rstd / unbiased variance), then one elementwise pass. Backward: a split reduction of
// sum(dy') and sum(dy' * (x - mean)) (writing dy' where the ReLU asks for it), a finalize kernel, then the
// elementwise input gradient. Two layouts: rows (channels_last: a warp reads 32 consecutive channels of a row)
// and planes (NCHW: a block reads one channel's contiguous run).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "../layout.h"
#include "../perturbed_norm_math.h"

namespace {

constexpr int kThreads = 256;
constexpr int kTileC = 32;     // rows layout: channels per block (one warp's width)
constexpr int kRowLanes = 8;   // rows layout: rows in flight per block

using Geo = anp::Geometry;

__device__ __forceinline__ int64_t elem(const Geo& g, int64_t gi, int64_t m, int64_t c) {
  // m-th element of channel c in group gi
  const int64_t n = gi * g.Ng + m / g.S, s = m % g.S;
  return g.rows ? (n * g.S + s) * g.C + c : (n * g.C + c) * g.S + s;
}

// ---- the two reductions, as functors over one element: return (v1, v2) to sum
template <typename T>
struct StatsTerm {
  const T* x;
  const float* k;  // (G, C) shift
  __device__ __forceinline__ void operator()(int64_t off, int64_t gc, float& v1, float& v2) const {
    float v = anp::to_float(x[off]) - k[gc];
    v1 = v;
    v2 = v * v;
  }
};

template <typename T, bool RELU>
struct GradTerm {
  const T *dy, *x, *y;
  T* gbuf;
  const float* mean;
  __device__ __forceinline__ void operator()(int64_t off, int64_t gc, float& v1, float& v2) const {
    float d = anp::to_float(dy[off]);
    if (RELU) {
      d = anp::relu_grad(anp::to_float(y[off]), d);
      gbuf[off] = anp::from_float<T>(d);
    }
    v1 = d;
    v2 = d * (anp::to_float(x[off]) - mean[gc]);
  }
};

// partial sums: out1/out2 (G, splits, C); grid (channel tiles, splits, G)
template <typename Term>
__global__ void partial_sums_rows(Geo g, int64_t chunk, int splits, Term term, float* out1, float* out2) {
  __shared__ float sh1[kRowLanes][kTileC + 1], sh2[kRowLanes][kTileC + 1];
  const int64_t c = blockIdx.x * kTileC + threadIdx.x;
  const int64_t gi = blockIdx.z, m0 = blockIdx.y * chunk, m1 = min(g.Mg, m0 + chunk);
  float a1 = 0.f, a2 = 0.f;
  if (c < g.C) {
    for (int64_t m = m0 + threadIdx.y; m < m1; m += kRowLanes) {
      float v1, v2;
      term(elem(g, gi, m, c), gi * g.C + c, v1, v2);
      a1 += v1;
      a2 += v2;
    }
  }
  sh1[threadIdx.y][threadIdx.x] = a1;
  sh2[threadIdx.y][threadIdx.x] = a2;
  __syncthreads();
  if (threadIdx.y == 0 && c < g.C) {
    for (int i = 1; i < kRowLanes; ++i) { a1 += sh1[i][threadIdx.x]; a2 += sh2[i][threadIdx.x]; }
    const int64_t o = (gi * splits + blockIdx.y) * g.C + c;
    out1[o] = a1;
    out2[o] = a2;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// planes layout: grid (C, splits, G), one block reduces one channel's slice
template <typename Term>
__global__ void partial_sums_planes(Geo g, int64_t chunk, int splits, Term term, float* out1, float* out2) {
  __shared__ float sh1[kThreads / 32], sh2[kThreads / 32];
  const int64_t c = blockIdx.x, gi = blockIdx.z, m0 = blockIdx.y * chunk, m1 = min(g.Mg, m0 + chunk);
  float a1 = 0.f, a2 = 0.f;
  for (int64_t m = m0 + threadIdx.x; m < m1; m += blockDim.x) {
    float v1, v2;
    term(elem(g, gi, m, c), gi * g.C + c, v1, v2);
    a1 += v1;
    a2 += v2;
  }
  a1 = warp_sum(a1);
  a2 = warp_sum(a2);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) { sh1[warp] = a1; sh2[warp] = a2; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < blockDim.x / 32; ++i) { a1 += sh1[i]; a2 += sh2[i]; }
    const int64_t o = (gi * splits + blockIdx.y) * g.C + c;
    out1[o] = a1;
    out2[o] = a2;
  }
}

// fp64 sums over the splits of one (group, channel)'s partials
__device__ __forceinline__ void sum_splits(const Geo& g, int splits, const float* p1, const float* p2, int64_t gi,
                                           int64_t c, double& s1, double& s2) {
  s1 = 0;
  s2 = 0;
  for (int s = 0; s < splits; ++s) {
    s1 += p1[(gi * splits + s) * g.C + c];
    s2 += p2[(gi * splits + s) * g.C + c];
  }
}

__global__ void finalize_stats(Geo g, int splits, const float* p1, const float* p2, const float* k, float* mean,
                               float* rstd, float* var_unbiased, double eps) {
  const int64_t i = blockIdx.x * blockDim.x + threadIdx.x;  // (group, channel)
  if (i >= g.G * g.C) return;
  const int64_t gi = i / g.C, c = i % g.C;
  double s1, s2;
  sum_splits(g, splits, p1, p2, gi, c, s1, s2);
  anp::Stats st = anp::stats_from_shifted_sums(k[i], s1, s2, g.Mg, eps);
  mean[i] = st.mean;
  rstd[i] = st.rstd;
  var_unbiased[i] = st.var_unbiased;
}

__global__ void finalize_grad(Geo g, int splits, const float* p1, const float* p2, const float* a, const float* rstd,
                              bool training, float* sum_dy, float* sum_dyxc, anp::GradConsts* consts) {
  const int64_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= g.G * g.C) return;
  const int64_t gi = i / g.C, c = i % g.C;
  double s1, s2;
  sum_splits(g, splits, p1, p2, gi, c, s1, s2);
  sum_dy[i] = static_cast<float>(s1);
  sum_dyxc[i] = static_cast<float>(s2);
  consts[i] = anp::grad_consts(a[i], rstd[i], s1, s2, g.Mg, training);
}

// (group * C + channel) of the element at memory index idx
__device__ __forceinline__ int64_t group_channel(const Geo& g, int64_t idx) {
  int64_t c, n;
  if (g.rows) {
    c = idx % g.C;
    n = idx / g.C / g.S;
  } else {
    c = (idx / g.S) % g.C;
    n = idx / (g.S * g.C);
  }
  return (n / g.Ng) * g.C + c;
}

template <typename T>
__global__ void normalize(Geo g, int64_t total, const T* x, const T* res, T* y, const float* mean, const float* rstd,
                          const float* a, const float* b, bool relu) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t gc = group_channel(g, idx);
    float v = anp::forward_value(anp::to_float(x[idx]), mean[gc], rstd[gc], a[gc], b[gc]);
    if (res) v += anp::to_float(res[idx]);
    y[idx] = anp::from_float<T>(relu ? anp::apply_relu(v) : v);
  }
}

template <typename T>
__global__ void input_grad(Geo g, int64_t total, const T* src, const T* x, T* dx, const float* mean,
                           const anp::GradConsts* consts) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t gc = group_channel(g, idx);
    dx[idx] = anp::from_float<T>(anp::input_grad(anp::to_float(src[idx]), anp::to_float(x[idx]), mean[gc], consts[gc]));
  }
}

// ---- host side
using anp::geometry;
using anp::in_layout;
using anp::like_layout;

// c10 only (not ATen/cuda, which pulls in the cuBLAS/cuSPARSE headers a bare toolkit may lack)
int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// splits so that the reduction grid has a few blocks per SM, and chunk (elements per block) for them
void split_plan(const Geo& g, int& splits, int64_t& chunk) {
  const int sms = sm_count();
  const int64_t tiles = (g.rows ? (g.C + kTileC - 1) / kTileC : g.C) * g.G;
  const int64_t want = std::max<int64_t>(1, (4 * sms + tiles - 1) / tiles);
  const int64_t min_chunk = g.rows ? 64 : 1024;
  const int64_t most = std::max<int64_t>(1, (g.Mg + min_chunk - 1) / min_chunk);
  splits = static_cast<int>(std::min<int64_t>(want, most));
  chunk = (g.Mg + splits - 1) / splits;
  splits = static_cast<int>((g.Mg + chunk - 1) / chunk);
}

template <typename Term>
void launch_partial(const Geo& g, int splits, int64_t chunk, Term term, float* o1, float* o2, cudaStream_t st) {
  if (g.rows) {
    dim3 grid((g.C + kTileC - 1) / kTileC, splits, g.G), block(kTileC, kRowLanes);
    partial_sums_rows<<<grid, block, 0, st>>>(g, chunk, splits, term, o1, o2);
  } else {
    dim3 grid(g.C, splits, g.G);
    partial_sums_planes<<<grid, kThreads, 0, st>>>(g, chunk, splits, term, o1, o2);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int elementwise_blocks(int64_t total) {
  const int sms = sm_count();
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 32LL * sms));
}

template <typename Fn>
void dispatch_type(at::ScalarType t, Fn fn) {
  if (t == at::kFloat) fn(float{});
  else fn(uint16_t{});
}

template <typename T> T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

void check(const at::Tensor& x, const at::Tensor& a) {
  TORCH_CHECK(x.is_cuda(), "anp_fast CUDA kernel: input must be on a CUDA device");
  TORCH_CHECK(x.dim() >= 2, "anp_fast CUDA kernel: input must be (N, C, ...)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "anp_fast CUDA kernel: float32 or bfloat16 input, got ", x.scalar_type());
  TORCH_CHECK(a.dim() == 2 && a.size(1) == x.size(1), "coefficient rows must be (G, C)");
  TORCH_CHECK(x.size(0) % a.size(0) == 0, "batch is not divisible into the coefficient groups");
}

}  // namespace

std::vector<at::Tensor> perturbed_batch_norm_forward_cuda(const at::Tensor& x_in, const at::Tensor& a_in,
                                                          const at::Tensor& b_in,
                                                          const c10::optional<at::Tensor>& residual,
                                                          const c10::optional<at::Tensor>& eval_mean,
                                                          const c10::optional<at::Tensor>& eval_rstd, bool relu,
                                                          bool training, double eps) {
  check(x_in, a_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = in_layout(x_in);
  const int64_t G = a_in.size(0);
  Geo g = geometry(x, G);
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor res = residual.has_value() ? like_layout(*residual, x) : at::Tensor();
  at::Tensor a = a_in.to(at::kFloat).contiguous(), b = b_in.to(at::kFloat).contiguous();
  at::Tensor mean = at::empty({G, g.C}, opts), rstd = at::empty({G, g.C}, opts), var = at::zeros({G, g.C}, opts);
  cudaStream_t st = c10::cuda::getCurrentCUDAStream();
  if (x.numel() == 0) return {y, mean, rstd, var};
  dispatch_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (training) {
      int splits;
      int64_t chunk;
      split_plan(g, splits, chunk);
      // shift of each (group, channel): its first element
      at::Tensor k = at::empty({G, g.C}, opts);
      {
        at::Tensor firsts = x.as_strided({G, g.C}, {x.stride(0) * g.Ng, x.stride(1)});
        k.copy_(firsts);
      }
      at::Tensor p1 = at::empty({G, splits, g.C}, opts), p2 = at::empty({G, splits, g.C}, opts);
      launch_partial(g, splits, chunk, StatsTerm<T>{ptr<T>(x), k.data_ptr<float>()}, p1.data_ptr<float>(),
                     p2.data_ptr<float>(), st);
      finalize_stats<<<(G * g.C + kThreads - 1) / kThreads, kThreads, 0, st>>>(
          g, splits, p1.data_ptr<float>(), p2.data_ptr<float>(), k.data_ptr<float>(), mean.data_ptr<float>(),
          rstd.data_ptr<float>(), var.data_ptr<float>(), eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      TORCH_CHECK(eval_mean.has_value() && eval_rstd.has_value(), "eval mode needs mean and rstd");
      mean.copy_(eval_mean->reshape({-1, g.C}).expand({G, g.C}));
      rstd.copy_(eval_rstd->reshape({-1, g.C}).expand({G, g.C}));
    }
    const int64_t total = x.numel();
    normalize<T><<<elementwise_blocks(total), kThreads, 0, st>>>(
        g, total, ptr<T>(x), res.defined() ? ptr<T>(res) : nullptr, ptr<T>(y), mean.data_ptr<float>(),
        rstd.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd, var};
}

std::vector<at::Tensor> perturbed_batch_norm_backward_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                           const c10::optional<at::Tensor>& y_in,
                                                           const at::Tensor& a_in, const at::Tensor& mean_in,
                                                           const at::Tensor& rstd_in, bool has_residual, bool relu,
                                                           bool training) {
  check(x_in, a_in);
  TORCH_CHECK(!relu || y_in.has_value(), "the ReLU backward needs the forward output");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = in_layout(x_in);
  const int64_t G = a_in.size(0);
  Geo g = geometry(x, G);
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor dy = like_layout(dy_in, x);
  at::Tensor y = relu ? like_layout(*y_in, x) : at::Tensor();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dres = (has_residual && relu) ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor gbuf = relu ? (has_residual ? dres : dx) : at::Tensor();
  at::Tensor a = a_in.to(at::kFloat).contiguous();
  at::Tensor mean = mean_in.to(at::kFloat).contiguous(), rstd = rstd_in.to(at::kFloat).contiguous();
  at::Tensor sum_dy = at::zeros({G, g.C}, opts), sum_dyxc = at::zeros({G, g.C}, opts);
  if (x.numel() == 0) return {dx, dres, sum_dy, sum_dyxc};
  cudaStream_t st = c10::cuda::getCurrentCUDAStream();
  int splits;
  int64_t chunk;
  split_plan(g, splits, chunk);
  at::Tensor p1 = at::empty({G, splits, g.C}, opts), p2 = at::empty({G, splits, g.C}, opts);
  at::Tensor consts = at::empty({static_cast<int64_t>(G * g.C * sizeof(anp::GradConsts))},
                                x.options().dtype(at::kByte));
  auto* cp = reinterpret_cast<anp::GradConsts*>(consts.data_ptr());
  dispatch_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (relu) {
      launch_partial(g, splits, chunk, GradTerm<T, true>{ptr<T>(dy), ptr<T>(x), ptr<T>(y), ptr<T>(gbuf),
                                                         mean.data_ptr<float>()},
                     p1.data_ptr<float>(), p2.data_ptr<float>(), st);
    } else {
      launch_partial(g, splits, chunk, GradTerm<T, false>{ptr<T>(dy), ptr<T>(x), nullptr, nullptr,
                                                          mean.data_ptr<float>()},
                     p1.data_ptr<float>(), p2.data_ptr<float>(), st);
    }
    finalize_grad<<<(G * g.C + kThreads - 1) / kThreads, kThreads, 0, st>>>(
        g, splits, p1.data_ptr<float>(), p2.data_ptr<float>(), a.data_ptr<float>(), rstd.data_ptr<float>(),
        training, sum_dy.data_ptr<float>(), sum_dyxc.data_ptr<float>(), cp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = x.numel();
    input_grad<T><<<elementwise_blocks(total), kThreads, 0, st>>>(
        g, total, relu ? ptr<T>(gbuf) : ptr<T>(dy), ptr<T>(x), ptr<T>(dx), mean.data_ptr<float>(), cp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dres, sum_dy, sum_dyxc};
}
