// Python bindings of the CPU fused LayerNorm and RMSNorm (megatron_snm._layer_norm): torch tensors in,
// raw pointers to layer_norm_cpu.h out.
#include <torch/extension.h>

#include <sys/mman.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "layer_norm_cpu.h"
#include "tensor_args.h"

namespace {

// An empty tensor like `like` whose large interior is advised for transparent huge pages. Big
// allocations come fresh from mmap, so the kernels' first writes fault page by page; at 4 KiB
// per fault that costs as much as the LayerNorm itself, at 2 MiB it is noise. Only a hint: where
// THP is off or the memory is recycled, nothing changes.
at::Tensor empty_output(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like);
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + t.nbytes()) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  return t;
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "megatron_snm._layer_norm: expected CPU tensors, got ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                       const at::Tensor& bias_in, double eps) {
  ln::check_forward_args(x_in, weight_in, bias_in);
  check_cpu(x_in);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor y = empty_output(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(ln::stats_dtype(x)));
  at::Tensor rstd = at::empty_like(mean);
  ln::cpu_forward(ln::to_dtype(x.scalar_type()), ln::to_dtype(weight.scalar_type()), x.data_ptr(),
                  weight.data_ptr(), bias.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                  rows, cols, eps);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> backward(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight_in, bool weight_grads) {
  ln::check_backward_args(dy_in, x_in, mean, rstd, weight_in);
  check_cpu(x_in);
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor dx = empty_output(x);
  std::optional<at::Tensor> dgamma, dbeta;
  if (weight_grads) {
    dgamma = at::empty_like(weight);
    dbeta = at::empty_like(weight);
  }
  ln::cpu_backward(ln::to_dtype(x.scalar_type()), ln::to_dtype(weight.scalar_type()), dy.data_ptr(),
                   x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), weight.data_ptr(), dx.data_ptr(),
                   weight_grads ? dgamma->data_ptr() : nullptr,
                   weight_grads ? dbeta->data_ptr() : nullptr, rows, cols);
  return {dx, dgamma, dbeta};
}

std::tuple<at::Tensor, at::Tensor> rms_forward(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  ln::check_input_and_weight("fused RMSNorm", x_in, weight_in);
  check_cpu(x_in);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor y = empty_output(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(ln::stats_dtype(x)));
  ln::cpu_rms_forward(ln::to_dtype(x.scalar_type()), ln::to_dtype(weight.scalar_type()), x.data_ptr(),
                      weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), rows, cols, eps);
  return {y, rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> rms_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                              const at::Tensor& rstd, const at::Tensor& weight_in,
                                                              bool weight_grad) {
  ln::check_rms_backward_args(dy_in, x_in, rstd, weight_in);
  check_cpu(x_in);
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor dx = empty_output(x);
  std::optional<at::Tensor> dgamma;
  if (weight_grad) dgamma = at::empty_like(weight);
  ln::cpu_rms_backward(ln::to_dtype(x.scalar_type()), ln::to_dtype(weight.scalar_type()), dy.data_ptr(),
                       x.data_ptr(), rstd.data_ptr(), weight.data_ptr(), dx.data_ptr(),
                       weight_grad ? dgamma->data_ptr() : nullptr, rows, cols);
  return {dx, dgamma};
}

void set_isa(const std::string& name) {
  TORCH_CHECK(ln::set_cpu_isa(name.c_str()), "megatron_snm._layer_norm: ISA '", name,
              "' is unknown or not supported by this CPU (choose 'avx2' or 'generic')");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused LayerNorm and RMSNorm over the last dimension, CPU kernels (float32 statistics)";
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
  m.def("isa", &ln::cpu_isa, "instruction set the kernels run with: 'avx2' or 'generic'");
  m.def("set_isa", &set_isa, "force the kernels' instruction set ('avx2' or 'generic'); for tests");
}
