// CPU fused LayerNorm and RMSNorm: splits the rows over threads (at::parallel_for) and calls the row kernels
// of layer_norm_cpu_rows.inc for the best instruction set this CPU has. Raw pointers only; the
// torch tensors are unpacked in bindings.cpp.
#include "layer_norm_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "layer_norm_cpu_kernels.h"

// The baseline build of the kernels (SSE2 on x86-64; the target's default elsewhere).
#define LN_ISA generic
#include "layer_norm_cpu_rows.inc"
#undef LN_ISA

namespace ln {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

std::atomic<bool> use_avx2{cpu_has_avx2()};

KernelSet kernels(DType x, DType w) {
  return use_avx2 ? avx2::kernel_set(x, w) : generic::kernel_set(x, w);
}

KernelSet rms_kernels(DType x, DType w) {
  return use_avx2 ? avx2::rms_kernel_set(x, w) : generic::rms_kernel_set(x, w);
}

// Elements per task: enough that waking a thread costs nothing next to the work.
constexpr int64_t kMinTaskElements = 32768;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(cols, 1)); }

// A task's scratch for the kernels: 3 * cols elements of the accumulation type (double-sized
// elements fit both float32 and float64).
std::vector<double> task_scratch(int64_t cols) { return std::vector<double>(static_cast<size_t>(3 * cols)); }

void run_forward(const KernelSet& k, const void* x, const void* gamma, const void* beta, void* y,
                 void* mean, void* rstd, int64_t rows, int64_t cols, double eps) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    std::vector<double> scratch = task_scratch(cols);
    k.forward(x, gamma, beta, y, mean, rstd, scratch.data(), r0, r1, cols, eps);
  });
}

void run_backward(const KernelSet& k, bool double_acc, const void* dy, const void* x, const void* mean,
                  const void* rstd, const void* gamma, void* dx, void* dgamma, void* dbeta,
                  int64_t rows, int64_t cols) {
  if (dgamma == nullptr) {
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
      std::vector<double> scratch = task_scratch(cols);
      k.backward_dx_only(dy, x, mean, rstd, gamma, dx, nullptr, scratch.data(), r0, r1, cols);
    });
    return;
  }
  // One block of rows per thread, each summing its rows' dgamma (and dbeta) into its own partial
  // buffer; the few buffers are then added up in parallel over columns. No atomics, and no
  // serial pass over the rows.
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), rows, rows * cols / kMinTaskElements}));
  const int64_t part_elements = k.grads * cols;
  const size_t n = static_cast<size_t>(parts * part_elements);
  std::vector<float> partials_f;
  std::vector<double> partials_d;
  char* partials;
  size_t acc_bytes;
  if (double_acc) {
    partials_d.assign(n, 0.0);
    partials = reinterpret_cast<char*>(partials_d.data());
    acc_bytes = sizeof(double);
  } else {
    partials_f.assign(n, 0.0f);
    partials = reinterpret_cast<char*>(partials_f.data());
    acc_bytes = sizeof(float);
  }
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<double> scratch = task_scratch(cols);
    for (int64_t p = p0; p < p1; ++p) {
      k.backward_with_weight_grads(dy, x, mean, rstd, gamma, dx, partials + p * part_elements * acc_bytes,
                                   scratch.data(), rows * p / parts, rows * (p + 1) / parts, cols);
    }
  });
  at::parallel_for(0, cols, 4096, [&](int64_t c0, int64_t c1) {
    k.reduce_partials(partials, parts, cols, dgamma, dbeta, c0, c1);
  });
}

}  // namespace

const char* cpu_isa() { return use_avx2 ? "avx2" : "generic"; }

bool set_cpu_isa(const char* name) {
  if (std::strcmp(name, "generic") == 0) {
    use_avx2 = false;
    return true;
  }
  if (std::strcmp(name, "avx2") == 0 && cpu_has_avx2()) {
    use_avx2 = true;
    return true;
  }
  return false;
}

void cpu_forward(DType x_type, DType w_type, const void* x, const void* gamma, const void* beta,
                 void* y, void* mean, void* rstd, int64_t rows, int64_t cols, double eps) {
  run_forward(kernels(x_type, w_type), x, gamma, beta, y, mean, rstd, rows, cols, eps);
}

void cpu_backward(DType x_type, DType w_type, const void* dy, const void* x, const void* mean,
                  const void* rstd, const void* gamma, void* dx, void* dgamma, void* dbeta,
                  int64_t rows, int64_t cols) {
  run_backward(kernels(x_type, w_type), stats_are_double(x_type), dy, x, mean, rstd, gamma, dx, dgamma,
               dbeta, rows, cols);
}

void cpu_rms_forward(DType x_type, DType w_type, const void* x, const void* gamma, void* y,
                     void* rstd, int64_t rows, int64_t cols, double eps) {
  run_forward(rms_kernels(x_type, w_type), x, gamma, nullptr, y, nullptr, rstd, rows, cols, eps);
}

void cpu_rms_backward(DType x_type, DType w_type, const void* dy, const void* x, const void* rstd,
                      const void* gamma, void* dx, void* dgamma, int64_t rows, int64_t cols) {
  run_backward(rms_kernels(x_type, w_type), stats_are_double(x_type), dy, x, nullptr, rstd, gamma, dx,
               dgamma, nullptr, rows, cols);
}

}  // namespace ln
