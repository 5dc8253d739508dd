// CUDA fused LayerNorm and RMSNorm kernels behind layer_norm_cuda.h. No torch headers: nvcc
// compiles this file on its own (tools/check_cuda_kernels.sh) and cuda_glue.cpp adapts it to
// torch tensors.
//
// Forward: one block per row (grid-stride over rows). Each thread reads 16-byte packs of x,
// folds each pack into a running Welford (count, mean, M2) in float32 (float64 for float64),
// the block merges those, and a second sweep over the row (now in L1/L2) writes y.
// Backward: a fixed grid of blocks sweeps the rows. Per row the block reduces sum(g) and
// sum(g * xhat) (g = dy * gamma) and writes dx; meanwhile each thread adds dy * xhat and dy for
// its own columns into the block's shared-memory dgamma/dbeta accumulators (no atomics: a
// thread owns the same columns in every row). Stage two adds the per-block partials up.
// RMSNorm (y = x * rstd * gamma, rstd = 1 / sqrt(mean(x^2) + eps)) is LayerNorm without the
// centring and the bias: its forward kernel sums squares instead of merging Welford summaries,
// and its backward pass is the LayerNorm kernel with the mean terms and dbeta compiled out
// (kCentred = false).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "layer_norm_cuda.h"

namespace ln {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;  // per block, forward and backward
// Backward blocks per SM: enough rows in flight to stream at full bandwidth, few enough that the
// per-block dgamma/dbeta partials (2 * cols floats each) stay a small share of the traffic.
constexpr int kMaxBackwardBlocksPerSm = 4;

// Accumulation type: float64 for float64 data, float32 otherwise.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using Acc = typename AccOf<T>::type;

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void from_acc(float v, float& out) { out = v; }
__device__ __forceinline__ void from_acc(double v, double& out) { out = v; }
__device__ __forceinline__ void from_acc(float v, __half& out) { out = __float2half_rn(v); }
__device__ __forceinline__ void from_acc(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }

// N consecutive elements moved as one (16-byte for the data) load or store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// Elements per 16-byte load of the data.
template <typename T> constexpr int pack_width() { return 16 / sizeof(T); }

template <typename A>
struct Welford {
  A count, mean, m2;
};

// Chan et al.'s merge of two partial (count, mean, M2) summaries.
template <typename A>
__device__ __forceinline__ Welford<A> merge(const Welford<A>& a, const Welford<A>& b) {
  const A n = a.count + b.count;
  if (n == A(0)) return a;
  const A delta = b.mean - a.mean;
  const A b_share = b.count / n;
  return {n, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share};
}

template <typename A>
__device__ __forceinline__ Welford<A> warp_reduce(Welford<A> w) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const Welford<A> other{__shfl_down_sync(0xffffffffu, w.count, offset),
                           __shfl_down_sync(0xffffffffu, w.mean, offset),
                           __shfl_down_sync(0xffffffffu, w.m2, offset)};
    w = merge(w, other);
  }
  return w;
}

template <typename A>
struct Sum2 {
  A a, b;
};

template <typename A>
__device__ __forceinline__ Sum2<A> warp_reduce(Sum2<A> s) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    s.a += __shfl_down_sync(0xffffffffu, s.a, offset);
    s.b += __shfl_down_sync(0xffffffffu, s.b, offset);
  }
  return s;
}

__device__ __forceinline__ float warp_reduce(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}
__device__ __forceinline__ double warp_reduce(double v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float zero_of(float) { return 0.f; }
__device__ __forceinline__ double zero_of(double) { return 0.0; }
__device__ __forceinline__ Welford<float> zero_of(Welford<float>) { return {0.f, 0.f, 0.f}; }
__device__ __forceinline__ Welford<double> zero_of(Welford<double>) { return {0.0, 0.0, 0.0}; }
__device__ __forceinline__ Sum2<float> zero_of(Sum2<float>) { return {0.f, 0.f}; }
__device__ __forceinline__ Sum2<double> zero_of(Sum2<double>) { return {0.0, 0.0}; }

// The block-wide reduction of a per-thread value, returned to every thread. `scratch` holds one
// value per warp; the leading __syncthreads lets the block reuse it row after row.
template <typename S>
__device__ __forceinline__ S block_reduce(S v, S* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_reduce(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarp) ? scratch[lane] : zero_of(v);
    v = warp_reduce(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

template <typename T, typename W, int N>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const T* __restrict__ x, const W* __restrict__ gamma, const W* __restrict__ beta,
                   T* __restrict__ y, Acc<T>* __restrict__ mean, Acc<T>* __restrict__ rstd,
                   int64_t rows, int cols, Acc<T> eps) {
  using A = Acc<T>;
  __shared__ Welford<A> scratch[kMaxThreads / kWarp];
  const int stride = blockDim.x * N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * cols;
    Welford<A> w{A(0), A(0), A(0)};
    for (int c = threadIdx.x * N; c < cols; c += stride) {
      // Summarise the pack exactly (two passes over registers), then merge it in.
      const Pack<T, N> p = load_pack<T, N>(xr + c);
      A v[N], sum = 0;
#pragma unroll
      for (int i = 0; i < N; ++i) sum += v[i] = to_acc(p.v[i]);
      const A pack_mean = sum / A(N);
      A m2 = 0;
#pragma unroll
      for (int i = 0; i < N; ++i) m2 += (v[i] - pack_mean) * (v[i] - pack_mean);
      w = merge(w, Welford<A>{A(N), pack_mean, m2});
    }
    w = block_reduce(w, scratch);
    const A m = w.mean;
    const A rs = A(1) / sqrt(w.m2 / A(cols) + eps);
    if (threadIdx.x == 0) {
      mean[row] = m;
      rstd[row] = rs;
    }
    T* yr = y + row * cols;
    for (int c = threadIdx.x * N; c < cols; c += stride) {
      const Pack<T, N> p = load_pack<T, N>(xr + c);
      const Pack<W, N> g = load_pack<W, N>(gamma + c);
      const Pack<W, N> b = load_pack<W, N>(beta + c);
      Pack<T, N> out;
#pragma unroll
      for (int i = 0; i < N; ++i) from_acc((to_acc(p.v[i]) - m) * rs * to_acc(g.v[i]) + to_acc(b.v[i]), out.v[i]);
      store_pack<T, N>(yr + c, out);
    }
  }
}

// RMSNorm: one block per row, as the LayerNorm forward; the statistic is the sum of squares.
template <typename T, typename W, int N>
__global__ void __launch_bounds__(kMaxThreads)
    rms_forward_kernel(const T* __restrict__ x, const W* __restrict__ gamma, T* __restrict__ y,
                       Acc<T>* __restrict__ rstd, int64_t rows, int cols, Acc<T> eps) {
  using A = Acc<T>;
  __shared__ A scratch[kMaxThreads / kWarp];
  const int stride = blockDim.x * N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * cols;
    A sq = 0;
    for (int c = threadIdx.x * N; c < cols; c += stride) {
      const Pack<T, N> p = load_pack<T, N>(xr + c);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const A v = to_acc(p.v[i]);
        sq += v * v;
      }
    }
    sq = block_reduce(sq, scratch);
    const A rs = A(1) / sqrt(sq / A(cols) + eps);
    if (threadIdx.x == 0) rstd[row] = rs;
    T* yr = y + row * cols;
    for (int c = threadIdx.x * N; c < cols; c += stride) {
      const Pack<T, N> p = load_pack<T, N>(xr + c);
      const Pack<W, N> g = load_pack<W, N>(gamma + c);
      Pack<T, N> out;
#pragma unroll
      for (int i = 0; i < N; ++i) from_acc(to_acc(p.v[i]) * rs * to_acc(g.v[i]), out.v[i]);
      store_pack<T, N>(yr + c, out);
    }
  }
}

// LayerNorm, with xhat = (x - mean) * rstd and g = dy * gamma:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
// RMSNorm (kCentred = false; `mean` unused), with xhat = x * rstd:
//   dx = rstd * (g - xhat * mean(g * xhat)), and no dbeta.
// The shared-memory accumulators are laid out so that, for each element of a pack, consecutive
// threads hit consecutive words (no bank conflicts): column chunk + t*N + i lives at
// chunk + i*blockDim + t. `acc_cols` is cols rounded up to whole chunks.
template <typename T, typename W, int N, bool kWeightGrads, bool kCentred>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const Acc<T>* __restrict__ mean,
                    const Acc<T>* __restrict__ rstd, const W* __restrict__ gamma, T* __restrict__ dx,
                    Acc<T>* __restrict__ partials, int64_t rows, int cols, int acc_cols) {
  using A = Acc<T>;
  __shared__ Sum2<A> scratch[kMaxThreads / kWarp];
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  A* acc_gamma = reinterpret_cast<A*>(dynamic_smem);
  A* acc_beta = acc_gamma + acc_cols;  // LayerNorm only
  const int stride = blockDim.x * N;
  const A inv_cols = A(1) / A(cols);

  if (kWeightGrads) {
    for (int k = threadIdx.x; k < acc_cols; k += blockDim.x) {
      acc_gamma[k] = A(0);
      if (kCentred) acc_beta[k] = A(0);
    }
    __syncthreads();
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * cols;
    const T* dyr = dy + row * cols;
    const A m = kCentred ? mean[row] : A(0), rs = rstd[row];
    Sum2<A> s{A(0), A(0)};
    for (int chunk = 0; chunk < cols; chunk += stride) {
      const int c = chunk + threadIdx.x * N;
      if (c >= cols) break;
      const Pack<T, N> pd = load_pack<T, N>(dyr + c);
      const Pack<T, N> px = load_pack<T, N>(xr + c);
      const Pack<W, N> pg = load_pack<W, N>(gamma + c);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const A d = to_acc(pd.v[i]);
        const A xhat = (to_acc(px.v[i]) - m) * rs;
        const A g = d * to_acc(pg.v[i]);
        if (kCentred) s.a += g;
        s.b += g * xhat;
        if (kWeightGrads) {
          const int k = chunk + i * blockDim.x + threadIdx.x;
          acc_gamma[k] += d * xhat;
          if (kCentred) acc_beta[k] += d;
        }
      }
    }
    s = block_reduce(s, scratch);
    const A a = kCentred ? s.a * inv_cols : A(0), b = s.b * inv_cols;
    T* dxr = dx + row * cols;
    for (int c = threadIdx.x * N; c < cols; c += stride) {
      const Pack<T, N> pd = load_pack<T, N>(dyr + c);
      const Pack<T, N> px = load_pack<T, N>(xr + c);
      const Pack<W, N> pg = load_pack<W, N>(gamma + c);
      Pack<T, N> out;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const A xhat = (to_acc(px.v[i]) - m) * rs;
        const A g = to_acc(pd.v[i]) * to_acc(pg.v[i]);
        from_acc((g - a - xhat * b) * rs, out.v[i]);
      }
      store_pack<T, N>(dxr + c, out);
    }
  }
  if (kWeightGrads) {
    // This block's partial sums, in plain column order: dgamma, then (LayerNorm) dbeta.
    constexpr int kGrads = kCentred ? 2 : 1;
    A* out = partials + static_cast<int64_t>(blockIdx.x) * kGrads * cols;
    for (int chunk = 0; chunk < cols; chunk += stride) {
      const int c = chunk + threadIdx.x * N;
      if (c >= cols) break;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int k = chunk + i * blockDim.x + threadIdx.x;
        out[c + i] = acc_gamma[k];
        if (kCentred) out[cols + c + i] = acc_beta[k];
      }
    }
  }
}

// Stage two: dgamma[c] and (LayerNorm, kGrads = 2) dbeta[c] are the sums of the `parts` partial
// rows of kGrads * cols. A block takes 32 columns; its 8 rows of threads split the partials and
// meet in shared memory.
template <typename W, typename A, int kGrads>
__global__ void __launch_bounds__(256) reduce_partials_kernel(const A* __restrict__ partials, int parts,
                                                                int cols, W* __restrict__ dgamma,
                                                                W* __restrict__ dbeta) {
  __shared__ A sum_gamma[8][kWarp + 1], sum_beta[8][kWarp + 1];
  const int c = blockIdx.x * kWarp + threadIdx.x;
  A g = 0, b = 0;
  if (c < cols) {
    for (int p = threadIdx.y; p < parts; p += blockDim.y) {
      g += partials[static_cast<int64_t>(p) * kGrads * cols + c];
      if (kGrads == 2) b += partials[static_cast<int64_t>(p) * kGrads * cols + cols + c];
    }
  }
  sum_gamma[threadIdx.y][threadIdx.x] = g;
  sum_beta[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    for (int r = 1; r < static_cast<int>(blockDim.y); ++r) {
      g += sum_gamma[r][threadIdx.x];
      b += sum_beta[r][threadIdx.x];
    }
    from_acc(g, dgamma[c]);
    if (kGrads == 2) from_acc(b, dbeta[c]);
  }
}

// Threads per block for a row of `cols` elements taken N at a time: whole warps, at most
// kMaxThreads, and as even a share of packs per thread as possible.
int threads_for(int64_t cols, int n) {
  const int64_t packs = (cols + n - 1) / n;
  const int64_t warps_needed = std::max<int64_t>(1, (packs + kWarp - 1) / kWarp);
  const int64_t max_warps = kMaxThreads / kWarp;
  const int64_t sweeps = (warps_needed + max_warps - 1) / max_warps;
  return static_cast<int>((warps_needed + sweeps - 1) / sweeps) * kWarp;
}

int sm_count() {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename X, typename Y>
struct TypePair {
  using T = X;
  using W = Y;
};

// Calls f(TypePair<T, W>{}) for the element types named by (x, w).
template <typename F>
cudaError_t dispatch(DType x, DType w, F&& f) {
  using D = DType;
  if (x == D::kFloat32 && w == D::kFloat32) return f(TypePair<float, float>{});
  if (x == D::kFloat64 && w == D::kFloat64) return f(TypePair<double, double>{});
  if (x == D::kBFloat16 && w == D::kBFloat16) return f(TypePair<__nv_bfloat16, __nv_bfloat16>{});
  if (x == D::kBFloat16 && w == D::kFloat32) return f(TypePair<__nv_bfloat16, float>{});
  if (x == D::kFloat16 && w == D::kFloat16) return f(TypePair<__half, __half>{});
  if (x == D::kFloat16 && w == D::kFloat32) return f(TypePair<__half, float>{});
  return cudaErrorInvalidValue;
}

// Calls f(TypePair<T, W>{}, std::integral_constant<int, N>{}) with N elements per load: the
// 16-byte pack width where cols is a multiple of it, every row pointer in `rows_data` is 16-byte
// aligned and every weight in `weights` aligned to one pack of W; else 1 (the scalar path).
template <typename F>
cudaError_t dispatch_packed(DType x, DType w, int64_t cols, std::initializer_list<const void*> rows_data,
                            std::initializer_list<const void*> weights, F&& f) {
  if (cols <= 0 || cols > 0x7fffffff) return cudaErrorInvalidValue;
  return dispatch(x, w, [&](auto types) {
    using T = typename decltype(types)::T;
    using W = typename decltype(types)::W;
    constexpr int N = pack_width<T>();
    bool vectorised = cols % N == 0;
    for (const void* p : rows_data) vectorised = vectorised && aligned(p, 16);
    for (const void* p : weights) vectorised = vectorised && aligned(p, sizeof(Pack<W, N>));
    return vectorised ? f(types, std::integral_constant<int, N>{}) : f(types, std::integral_constant<int, 1>{});
  });
}

constexpr int64_t kMaxGrid = 0x7fffffff;

template <typename T, typename W, int N>
cudaError_t launch_forward(const void* x, const void* gamma, const void* beta, void* y, void* mean,
                           void* rstd, int64_t rows, int64_t cols, double eps, cudaStream_t stream) {
  const int threads = threads_for(cols, N);
  const unsigned blocks = static_cast<unsigned>(std::min(rows, kMaxGrid));
  forward_kernel<T, W, N><<<blocks, threads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const W*>(gamma), static_cast<const W*>(beta),
      static_cast<T*>(y), static_cast<Acc<T>*>(mean), static_cast<Acc<T>*>(rstd), rows,
      static_cast<int>(cols), static_cast<Acc<T>>(eps));
  return cudaGetLastError();
}

template <typename T, typename W, int N>
cudaError_t launch_rms_forward(const void* x, const void* gamma, void* y, void* rstd, int64_t rows,
                               int64_t cols, double eps, cudaStream_t stream) {
  const int threads = threads_for(cols, N);
  const unsigned blocks = static_cast<unsigned>(std::min(rows, kMaxGrid));
  rms_forward_kernel<T, W, N><<<blocks, threads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const W*>(gamma), static_cast<T*>(y),
      static_cast<Acc<T>*>(rstd), rows, static_cast<int>(cols), static_cast<Acc<T>>(eps));
  return cudaGetLastError();
}

int64_t backward_blocks_bound(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, static_cast<int64_t>(sm_count()) * kMaxBackwardBlocksPerSm));
}

// kCentred: LayerNorm (dgamma and dbeta); otherwise RMSNorm (dgamma only; mean and dbeta null).
template <typename T, typename W, int N, bool kCentred>
cudaError_t launch_backward(const void* dy, const void* x, const void* mean, const void* rstd,
                            const void* gamma, void* dx, void* dgamma, void* dbeta, void* workspace,
                            int64_t rows, int64_t cols, cudaStream_t stream) {
  using A = Acc<T>;
  const int threads = threads_for(cols, N);
  const int64_t chunk = static_cast<int64_t>(threads) * N;
  const int acc_cols = static_cast<int>((cols + chunk - 1) / chunk * chunk);
  constexpr int kGrads = kCentred ? 2 : 1;
  const bool weight_grads = dgamma != nullptr && (!kCentred || dbeta != nullptr);
  auto kernel = weight_grads ? backward_kernel<T, W, N, true, kCentred> : backward_kernel<T, W, N, false, kCentred>;
  const size_t smem = weight_grads ? kGrads * static_cast<size_t>(acc_cols) * sizeof(A) : 0;
  cudaError_t err;
  if (smem > 48 * 1024) {  // beyond the default: opt in, up to what the device allows
    int device = 0, optin = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (smem > static_cast<size_t>(optin)) return cudaErrorInvalidConfiguration;
    if ((err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem))) != cudaSuccess)
      return err;
  }
  int per_sm = 1;
  if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem)) != cudaSuccess)
    return err;
  const int64_t blocks = std::min<int64_t>(backward_blocks_bound(rows),
                                           static_cast<int64_t>(sm_count()) * std::max(per_sm, 1));
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(mean),
      static_cast<const A*>(rstd), static_cast<const W*>(gamma), static_cast<T*>(dx),
      static_cast<A*>(workspace), rows, static_cast<int>(cols), acc_cols);
  if ((err = cudaGetLastError()) != cudaSuccess || !weight_grads) return err;
  const dim3 reduce_threads(kWarp, 8);
  const unsigned reduce_blocks = static_cast<unsigned>((cols + kWarp - 1) / kWarp);
  reduce_partials_kernel<W, A, kGrads><<<reduce_blocks, reduce_threads, 0, stream>>>(
      static_cast<const A*>(workspace), static_cast<int>(blocks), static_cast<int>(cols),
      static_cast<W*>(dgamma), static_cast<W*>(dbeta));
  return cudaGetLastError();
}

// Bytes of the per-block partials of `grads` weight gradients (2: LayerNorm, 1: RMSNorm).
size_t workspace_bytes(DType x_type, int grads, int64_t rows, int64_t cols) {
  const size_t acc_bytes = x_type == DType::kFloat64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(backward_blocks_bound(rows)) * grads * static_cast<size_t>(cols) * acc_bytes;
}

}  // namespace

cudaError_t cuda_forward(DType x_type, DType w_type, const void* x, const void* gamma,
                         const void* beta, void* y, void* mean, void* rstd, int64_t rows,
                         int64_t cols, double eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch_packed(x_type, w_type, cols, {x, y}, {gamma, beta}, [&](auto types, auto n) {
    return launch_forward<typename decltype(types)::T, typename decltype(types)::W, decltype(n)::value>(
        x, gamma, beta, y, mean, rstd, rows, cols, eps, stream);
  });
}

size_t cuda_backward_workspace_bytes(DType x_type, DType /*w_type*/, int64_t rows, int64_t cols) {
  return workspace_bytes(x_type, 2, rows, cols);
}

cudaError_t cuda_backward(DType x_type, DType w_type, const void* dy, const void* x,
                          const void* mean, const void* rstd, const void* gamma, void* dx,
                          void* dgamma, void* dbeta, void* workspace, int64_t rows, int64_t cols,
                          cudaStream_t stream) {
  return dispatch_packed(x_type, w_type, cols, {x, dy, dx}, {gamma}, [&](auto types, auto n) {
    return launch_backward<typename decltype(types)::T, typename decltype(types)::W, decltype(n)::value, true>(
        dy, x, mean, rstd, gamma, dx, dgamma, dbeta, workspace, rows, cols, stream);
  });
}

cudaError_t cuda_rms_forward(DType x_type, DType w_type, const void* x, const void* gamma, void* y,
                             void* rstd, int64_t rows, int64_t cols, double eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch_packed(x_type, w_type, cols, {x, y}, {gamma}, [&](auto types, auto n) {
    return launch_rms_forward<typename decltype(types)::T, typename decltype(types)::W, decltype(n)::value>(
        x, gamma, y, rstd, rows, cols, eps, stream);
  });
}

size_t cuda_rms_backward_workspace_bytes(DType x_type, DType /*w_type*/, int64_t rows, int64_t cols) {
  return workspace_bytes(x_type, 1, rows, cols);
}

cudaError_t cuda_rms_backward(DType x_type, DType w_type, const void* dy, const void* x, const void* rstd,
                              const void* gamma, void* dx, void* dgamma, void* workspace, int64_t rows,
                              int64_t cols, cudaStream_t stream) {
  return dispatch_packed(x_type, w_type, cols, {x, dy, dx}, {gamma}, [&](auto types, auto n) {
    return launch_backward<typename decltype(types)::T, typename decltype(types)::W, decltype(n)::value, false>(
        dy, x, nullptr, rstd, gamma, dx, dgamma, nullptr, workspace, rows, cols, stream);
  });
}

}  // namespace ln
