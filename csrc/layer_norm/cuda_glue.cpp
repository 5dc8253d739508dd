// Python bindings of the CUDA fused LayerNorm and RMSNorm (megatron_snm._layer_norm_cuda): torch tensors in,
// device pointers and the current stream to layer_norm_cuda.h out. Same functions and checks as
// the CPU bindings, so the Python front treats both alike.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "layer_norm_cuda.h"
#include "tensor_args.h"

namespace {

void check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "megatron_snm._layer_norm_cuda: expected CUDA tensors, got ", x.device());
}

void check_launch(cudaError_t err, const char* what, int64_t cols) {
  TORCH_CHECK(err != cudaErrorInvalidConfiguration, "megatron_snm._layer_norm_cuda: ", what,
              ": a hidden size of ", cols,
              " needs more shared memory for the weight-gradient accumulators than this GPU has");
  TORCH_CHECK(err == cudaSuccess, "megatron_snm._layer_norm_cuda: ", what, " failed: ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                       const at::Tensor& bias_in, double eps) {
  ln::check_forward_args(x_in, weight_in, bias_in);
  check_cuda(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(ln::stats_dtype(x)));
  at::Tensor rstd = at::empty_like(mean);
  check_launch(ln::cuda_forward(ln::to_dtype(x.scalar_type()), ln::to_dtype(weight.scalar_type()),
                                x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                mean.data_ptr(), rstd.data_ptr(), rows, cols, eps,
                                c10::cuda::getCurrentCUDAStream()),
               "forward", cols);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> backward(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight_in, bool weight_grads) {
  ln::check_backward_args(dy_in, x_in, mean, rstd, weight_in);
  check_cuda(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  const ln::DType x_type = ln::to_dtype(x.scalar_type()), w_type = ln::to_dtype(weight.scalar_type());
  at::Tensor dx = at::empty_like(x);
  std::optional<at::Tensor> dgamma, dbeta;
  at::Tensor workspace;
  if (weight_grads) {
    dgamma = at::empty_like(weight);
    dbeta = at::empty_like(weight);
    workspace = at::empty({static_cast<int64_t>(ln::cuda_backward_workspace_bytes(x_type, w_type, rows, cols))},
                          x.options().dtype(at::kByte));
  }
  check_launch(ln::cuda_backward(x_type, w_type, dy.data_ptr(), x.data_ptr(), mean.data_ptr(),
                                 rstd.data_ptr(), weight.data_ptr(), dx.data_ptr(),
                                 weight_grads ? dgamma->data_ptr() : nullptr,
                                 weight_grads ? dbeta->data_ptr() : nullptr,
                                 weight_grads ? workspace.data_ptr() : nullptr, rows, cols,
                                 c10::cuda::getCurrentCUDAStream()),
               "backward", cols);
  return {dx, dgamma, dbeta};
}

std::tuple<at::Tensor, at::Tensor> rms_forward(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  ln::check_input_and_weight("fused RMSNorm", x_in, weight_in);
  check_cuda(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(ln::stats_dtype(x)));
  check_launch(ln::cuda_rms_forward(ln::to_dtype(x.scalar_type()), ln::to_dtype(weight.scalar_type()),
                                    x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), rows,
                                    cols, eps, c10::cuda::getCurrentCUDAStream()),
               "rms_forward", cols);
  return {y, rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> rms_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                              const at::Tensor& rstd, const at::Tensor& weight_in,
                                                              bool weight_grad) {
  ln::check_rms_backward_args(dy_in, x_in, rstd, weight_in);
  check_cuda(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  const ln::DType x_type = ln::to_dtype(x.scalar_type()), w_type = ln::to_dtype(weight.scalar_type());
  at::Tensor dx = at::empty_like(x);
  std::optional<at::Tensor> dgamma;
  at::Tensor workspace;
  if (weight_grad) {
    dgamma = at::empty_like(weight);
    workspace = at::empty({static_cast<int64_t>(ln::cuda_rms_backward_workspace_bytes(x_type, w_type, rows, cols))},
                          x.options().dtype(at::kByte));
  }
  check_launch(ln::cuda_rms_backward(x_type, w_type, dy.data_ptr(), x.data_ptr(), rstd.data_ptr(),
                                     weight.data_ptr(), dx.data_ptr(), weight_grad ? dgamma->data_ptr() : nullptr,
                                     weight_grad ? workspace.data_ptr() : nullptr, rows, cols,
                                     c10::cuda::getCurrentCUDAStream()),
               "rms_backward", cols);
  return {dx, dgamma};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused LayerNorm and RMSNorm over the last dimension, CUDA kernels (float32 statistics)";
  m.def("forward", &forward, "(x[rows, cols], weight[cols], bias[cols], eps) -> (y, mean, rstd)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("backward", &backward,
        "(dy, x, mean, rstd, weight, weight_grads) -> (dx, dweight | None, dbias | None)",
        py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
        py::arg("weight_grads"));
  m.def("rms_forward", &rms_forward, "(x[rows, cols], weight[cols], eps) -> (y, rstd)", py::arg("x"),
        py::arg("weight"), py::arg("eps"));
  m.def("rms_backward", &rms_backward, "(dy, x, rstd, weight, weight_grad) -> (dx, dweight | None)",
        py::arg("dy"), py::arg("x"), py::arg("rstd"), py::arg("weight"), py::arg("weight_grad"));
}
