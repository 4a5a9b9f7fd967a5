// pybind11 face of the CUDA kernels (csrc/cuda/perturbed_batch_norm.cu); same contract as the CPU module.
#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> perturbed_batch_norm_forward_cuda(const at::Tensor& x, const at::Tensor& a,
                                                          const at::Tensor& b,
                                                          const c10::optional<at::Tensor>& residual,
                                                          const c10::optional<at::Tensor>& eval_mean,
                                                          const c10::optional<at::Tensor>& eval_rstd, bool relu,
                                                          bool training, double eps);
std::vector<at::Tensor> perturbed_batch_norm_backward_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                           const c10::optional<at::Tensor>& y, const at::Tensor& a,
                                                           const at::Tensor& mean, const at::Tensor& rstd,
                                                           bool has_residual, bool relu, bool training);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "anp_fast CUDA kernels of the perturbed batch norm";
  m.def("perturbed_batch_norm_forward", &perturbed_batch_norm_forward_cuda, "forward (see csrc/cuda)");
  m.def("perturbed_batch_norm_backward", &perturbed_batch_norm_backward_cuda, "backward (see csrc/cuda)");
}
