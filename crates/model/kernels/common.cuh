// Shared by the kernels: conversions between the storage dtypes and f32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// GELU, exact (erf), as the reference's "gelu".
__device__ __forceinline__ float gelu_erf(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

// 16 bytes of one dtype, moved with one access: 8 bf16/f16 or 4 f32. Callers
// guarantee 16-byte alignment.
template <typename T> struct VecOf { static constexpr int N = 16 / sizeof(T); };
template <typename T> struct __align__(16) Vec { T e[VecOf<T>::N]; };
template <typename T> __device__ __forceinline__ Vec<T> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}
template <typename T> __device__ __forceinline__ void store_vec(T* p, const Vec<T>& v) {
  *reinterpret_cast<Vec<T>*>(p) = v;
}
// GELU in place on one 16-byte vector.
template <typename T> __device__ __forceinline__ void gelu_vec(T* p) {
  Vec<T> a = load_vec(p);
#pragma unroll
  for (int j = 0; j < VecOf<T>::N; j++) a.e[j] = from_f<T>(gelu_erf(to_f(a.e[j])));
  store_vec(p, a);
}
