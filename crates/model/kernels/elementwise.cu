// Fused elementwise kernels for the GPT-NeoX layer on CUDA. candle's broadcast
// add indexes every element through the strides of a generic layout, which made
// bias and residual adds over half of a token step's device time at batch 2048.
// These take contiguous rows and round once per op, as candle's bf16 ops do.
#include "common.cuh"


// y[r, c] += bias[c], in place; then GELU (exact erf) when `gelu` is set, on the
// rounded sum, as candle's separate add and gelu_erf compute it.
template <typename T>
__device__ void bias_act(T* y, const T* bias, size_t n, int cols, int gelu) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v = to_f(from_f<T>(to_f(y[i]) + to_f(bias[i % cols])));
    if (gelu) v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    y[i] = from_f<T>(v);
  }
}

// out = a + b + c (the parallel residual), rounding after each add like candle.
template <typename T>
__device__ void add3(T* out, const T* a, const T* b, const T* c, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float ab = to_f(from_f<T>(to_f(a[i]) + to_f(b[i])));
    out[i] = from_f<T>(ab + to_f(c[i]));
  }
}

#define OPS(S, T)                                                                                      \
  extern "C" __global__ void bias_act_##S(T* y, const T* bias, unsigned long long n, int cols, int g) { \
    bias_act<T>(y, bias, n, cols, g);                                                                  \
  }                                                                                                    \
  extern "C" __global__ void add3_##S(T* out, const T* a, const T* b, const T* c, unsigned long long n) { \
    add3<T>(out, a, b, c, n);                                                                          \
  }
OPS(f32, float)
OPS(bf16, __nv_bfloat16)
OPS(f16, __half)
