// Fused elementwise kernels for the GPT-NeoX layer on CUDA. candle's broadcast
// add indexes every element through the strides of a generic layout, which made
// bias and residual adds over half of a token step's device time at batch 2048.
// These take contiguous rows and round once per op, as candle's bf16 ops do.
// The `_v` forms move 16 bytes per access (8 bf16/f16 or 4 f32): the scalar
// ones ran at about 550 GB/s on an H200; the host takes them when the sizes
// and offsets divide by the vector width.
#include "common.cuh"


// y[r, c] += bias[c], in place; then GELU (exact erf) when `gelu` is set, on the
// rounded sum, as candle's separate add and gelu_erf compute it.
template <typename T>
__device__ __forceinline__ float bias_act1(T y, T bias, int gelu) {
  float v = to_f(from_f<T>(to_f(y) + to_f(bias)));
  return gelu ? gelu_erf(v) : v;
}

template <typename T>
__device__ void bias_act(T* y, const T* bias, size_t n, int cols, int gelu) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(bias_act1(y[i], bias[i % cols], gelu));
}

// The same over vectors: nv vectors of y, rows of cv vectors.
template <typename T>
__device__ void bias_act_v(T* y, const T* bias, unsigned nv, unsigned cv, int gelu) {
  constexpr int N = VecOf<T>::N;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < nv; i += gridDim.x * blockDim.x) {
    Vec<T> a = load_vec(y + (size_t)i * N), b = load_vec(bias + (size_t)(i % cv) * N);
#pragma unroll
    for (int j = 0; j < N; j++) a.e[j] = from_f<T>(bias_act1(a.e[j], b.e[j], gelu));
    store_vec(y + (size_t)i * N, a);
  }
}

// GELU (exact erf) in place over a column range of rows (the fused layer's
// MLP half of its projection buffer, whose bias the GEMM added): `rows` rows
// of `cv` vectors, row starts `ldv` vectors apart, from `y`.
template <typename T>
__device__ void gelu_rows_v(T* y, unsigned rows, unsigned cv, unsigned ldv) {
  constexpr int N = VecOf<T>::N;
  const unsigned nv = rows * cv;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < nv; i += gridDim.x * blockDim.x)
    gelu_vec(y + ((size_t)(i / cv) * ldv + i % cv) * N);
}

// out = a + b + c (the parallel residual), rounding after each add like candle.
template <typename T>
__device__ __forceinline__ T add3_1(T a, T b, T c) {
  return from_f<T>(to_f(from_f<T>(to_f(a) + to_f(b))) + to_f(c));
}

template <typename T>
__device__ void add3(T* out, const T* a, const T* b, const T* c, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = add3_1(a[i], b[i], c[i]);
}

template <typename T>
__device__ void add3_v(T* out, const T* a, const T* b, const T* c, unsigned nv) {
  constexpr int N = VecOf<T>::N;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < nv; i += gridDim.x * blockDim.x) {
    size_t o = (size_t)i * N;
    Vec<T> x = load_vec(a + o), y = load_vec(b + o), z = load_vec(c + o);
#pragma unroll
    for (int j = 0; j < N; j++) x.e[j] = add3_1(x.e[j], y.e[j], z.e[j]);
    store_vec(out + o, x);
  }
}

#define OPS(S, T)                                                                                      \
  extern "C" __global__ void bias_act_##S(T* y, const T* bias, unsigned long long n, int cols, int g) { \
    bias_act<T>(y, bias, n, cols, g);                                                                  \
  }                                                                                                    \
  extern "C" __global__ void bias_act_v_##S(T* y, const T* bias, unsigned nv, unsigned cv, int g) {    \
    bias_act_v<T>(y, bias, nv, cv, g);                                                                 \
  }                                                                                                    \
  extern "C" __global__ void gelu_rows_v_##S(T* y, unsigned rows, unsigned cv, unsigned ldv) {        \
    gelu_rows_v<T>(y, rows, cv, ldv);                                                                  \
  }                                                                                                    \
  extern "C" __global__ void add3_##S(T* out, const T* a, const T* b, const T* c, unsigned long long n) { \
    add3<T>(out, a, b, c, n);                                                                          \
  }                                                                                                    \
  extern "C" __global__ void add3_v_##S(T* out, const T* a, const T* b, const T* c, unsigned nv) {     \
    add3_v<T>(out, a, b, c, nv);                                                                       \
  }
OPS(f32, float)
OPS(bf16, __nv_bfloat16)
OPS(f16, __half)
