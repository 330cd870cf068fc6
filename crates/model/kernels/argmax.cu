// Row-wise argmax of logits [rows, n] -> u32 [rows], first index on ties (as
// torch.argmax and the CPU `sampling::argmax`). One CTA per row; each thread
// scans a strided slice with 16-byte loads, then warps and the block reduce.
#include "common.cuh"

// Keep (v, i) if it beats (bv, bi): larger value, or equal value and smaller index.
__device__ __forceinline__ void better(float v, uint32_t i, float& bv, uint32_t& bi) {
  if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
}

template <typename T>
__device__ void argmax_rows(const T* x, uint32_t* out, int n, size_t row_stride) {
  constexpr int VEC = 16 / sizeof(T);
  const T* row = x + blockIdx.x * row_stride;
  float bv = -INFINITY;
  uint32_t bi = 0xffffffffu;
  // Vector part: rows start 16-byte aligned when n * sizeof(T) is a multiple of 16.
  const bool aligned = ((row_stride * sizeof(T)) % 16 == 0) && (((size_t)x) % 16 == 0);
  int start = 0;
  if (aligned) {
    int nv = n / VEC;
    const uint4* rv = reinterpret_cast<const uint4*>(row);
    // Unrolled so that several loads are in flight per thread (a row of
    // 50k bf16 logits is about six vectors a thread).
#pragma unroll 4
    for (int j = threadIdx.x; j < nv; j += blockDim.x) {
      uint4 raw = rv[j];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < VEC; k++) better(to_f(e[k]), j * VEC + k, bv, bi);
    }
    start = nv * VEC;
  }
  for (int j = start + threadIdx.x; j < n; j += blockDim.x) better(to_f(row[j]), j, bv, bi);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    float v = __shfl_xor_sync(0xffffffff, bv, o);
    uint32_t i = __shfl_xor_sync(0xffffffff, bi, o);
    better(v, i, bv, bi);
  }
  __shared__ float sv[32];
  __shared__ uint32_t si[32];
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
  __syncthreads();
  if (warp == 0) {
    int warps = blockDim.x / 32;
    bv = lane < warps ? sv[lane] : -INFINITY;
    bi = lane < warps ? si[lane] : 0xffffffffu;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      float v = __shfl_xor_sync(0xffffffff, bv, o);
      uint32_t i = __shfl_xor_sync(0xffffffff, bi, o);
      better(v, i, bv, bi);
    }
    // A row of NaNs only: report index 0.
    if (lane == 0) out[blockIdx.x] = bi == 0xffffffffu ? 0 : bi;
  }
}

extern "C" __global__ void argmax_f32(const float* x, uint32_t* out, int n, unsigned long long s) { argmax_rows(x, out, n, s); }
extern "C" __global__ void argmax_bf16(const __nv_bfloat16* x, uint32_t* out, int n, unsigned long long s) { argmax_rows(x, out, n, s); }
extern "C" __global__ void argmax_f16(const __half* x, uint32_t* out, int n, unsigned long long s) { argmax_rows(x, out, n, s); }
