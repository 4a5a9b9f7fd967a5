// Host-side layout handling shared by the CPU and CUDA sources: the input is read as (N, C, S), S the product
// of the spatial sizes, in one of two layouts -- rows (channels_last, or S == 1: element (n, c, s) at
// (n * S + s) * C + c) or planes (contiguous NCHW: at (n * C + c) * S + s).
#pragma once

#include <ATen/ATen.h>

namespace anp {

struct Geometry {
  int64_t N, C, S, G, Ng, Mg;  // Ng = N / G samples per group; Mg = Ng * S elements per (group, channel)
  bool rows;
};

inline bool is_rows_layout(const at::Tensor& x) {
  if (x.numel() == 0) return false;
  const int64_t S = x.numel() / (x.size(0) * x.size(1));
  if (S == 1) return x.is_contiguous();
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !x.is_contiguous();
  return false;
}

// x itself when it is in one of the two layouts, else a contiguous copy.
inline at::Tensor in_layout(const at::Tensor& x) {
  return (is_rows_layout(x) || x.is_contiguous()) ? x : x.contiguous();
}

// t with exactly the strides of `like` (the residual, dy and y follow the input's layout).
inline at::Tensor like_layout(const at::Tensor& t, const at::Tensor& like) {
  return t.strides() == like.strides() ? t : at::empty_like(like).copy_(t);
}

inline Geometry geometry(const at::Tensor& x, int64_t G) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = x.numel() / (g.N * g.C);
  g.G = G;
  g.Ng = g.N / G;
  g.Mg = g.Ng * g.S;
  g.rows = is_rows_layout(x);
  return g;
}

}  // namespace anp
