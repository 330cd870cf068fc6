// Paged key/value cache kernels for the GPT-NeoX stacks (block decoder, token
// decoder, vanilla LM). The CPU versions in src/paged/cpu.rs compute the same
// functions; the fixture tests hold both to the reference.
//
// Layouts (all contiguous):
//   qkv   [n, heads, 3, head_dim]   the fused projection, per head [q|k|v]
//   pool  [slots, 2, heads, head_dim] slot = page * page_size + offset; K then V
//   index u32: meta [n, 3] = (slot, position, table row) of each new token,
//         then tables [rows, max_pages] = each row's pages in order
//   out   [n, heads * head_dim]
// Rotary (rotate-half over the first `rot` channels) is applied to q and k here,
// with the angles computed in f32 exactly as the host's table is.
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

// Eight consecutive elements as floats; p is 16-byte aligned for 2-byte types.
__device__ __forceinline__ void load8(const float* p, float* o) {
  float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
template <typename T> __device__ __forceinline__ void load8(const T* p, float* o) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < 8; j++) o[j] = to_f(e[j]);
}

// Channel c of a rotated head vector x (first `rot` channels rotate-half).
template <typename T>
__device__ __forceinline__ float rope_at(const T* x, int c, int rot, int pos, float base) {
  float v = to_f(x[c]);
  if (c >= rot) return v;
  int half = rot / 2;
  int i = c < half ? c : c - half;
  float inv_freq = 1.0f / powf(base, (float)(2 * i) / (float)rot);
  float s, co;
  sincosf((float)pos * inv_freq, &s, &co);
  return c < half ? v * co - to_f(x[c + half]) * s : v * co + to_f(x[c - half]) * s;
}

// Grid (n, heads), block head_dim threads: rotate k, copy v, into the token's slot.
template <typename T>
__device__ void kv_write(T* pool, const T* qkv, const uint32_t* meta, int heads, int hd, int rot, float base) {
  int i = blockIdx.x, h = blockIdx.y, c = threadIdx.x;
  uint32_t slot = meta[3 * i], pos = meta[3 * i + 1];
  const T* k = qkv + ((size_t)i * heads + h) * 3 * hd + hd;
  float kr = rope_at(k, c, rot, pos, base);
  T* dst = pool + ((size_t)slot * 2 * heads + h) * hd;
  dst[c] = from_f<T>(kr);
  dst[(size_t)heads * hd + c] = k[hd + c];
}

#define MAX_WARPS 4

// Grid (n, heads), block 32 * warps threads. Softmax attention of token i's
// rotated, scaled query over keys 0..=pos of its row. Lanes work in groups of
// G = HD / 8, one key per group and eight channels per lane; each group keeps an
// online softmax, merged across groups by shuffles and across warps in shared
// memory. Scores and softmax in f32.
template <typename T, int HD>
__device__ void paged_attn(T* out, const T* qkv, const T* pool, const uint32_t* index, int n, int heads,
                           int rot, float base, int page_size, int max_pages, float scale) {
  constexpr int G = HD / 8;
  constexpr int KP = 32 / G;
  const int i = blockIdx.x, h = blockIdx.y;
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / G, gl = lane % G;
  const uint32_t pos = index[3 * i + 1], row = index[3 * i + 2];
  const uint32_t* table = index + 3 * (size_t)n + (size_t)row * max_pages;
  const int nkeys = pos + 1;

  __shared__ float qs[HD];
  __shared__ float sm[MAX_WARPS], sl[MAX_WARPS];
  __shared__ float sacc[MAX_WARPS][HD];
  const T* q = qkv + ((size_t)i * heads + h) * 3 * HD;
  for (int c = threadIdx.x; c < HD; c += blockDim.x) qs[c] = rope_at(q, c, rot, pos, base) * scale;
  __syncthreads();
  float qr[8];
#pragma unroll
  for (int j = 0; j < 8; j++) qr[j] = qs[gl * 8 + j];

  float m = -INFINITY, l = 0.f, acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int base_key = warp * KP; base_key < nkeys; base_key += warps * KP) {
    const int key = base_key + g;
    const bool valid = key < nkeys;
    float s = 0.f;
    const T* kp = nullptr;
    if (valid) {
      uint32_t slot = table[key / page_size] * (uint32_t)page_size + key % page_size;
      kp = pool + ((size_t)slot * 2 * heads + h) * HD + gl * 8;
      float kf[8];
      load8(kp, kf);
#pragma unroll
      for (int j = 0; j < 8; j++) s += qr[j] * kf[j];
    }
#pragma unroll
    for (int o = G / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffff, s, o);
    if (valid) {
      float vf[8];
      load8(kp + (size_t)heads * HD, vf);
      float mn = fmaxf(m, s);
      float corr = __expf(m - mn), p = __expf(s - mn);
      l = l * corr + p;
#pragma unroll
      for (int j = 0; j < 8; j++) acc[j] = acc[j] * corr + p * vf[j];
      m = mn;
    }
  }
  // Merge the groups of this warp (same channels, different keys).
#pragma unroll
  for (int o = G; o < 32; o *= 2) {
    float m2 = __shfl_xor_sync(0xffffffff, m, o), l2 = __shfl_xor_sync(0xffffffff, l, o);
    float a2[8];
#pragma unroll
    for (int j = 0; j < 8; j++) a2[j] = __shfl_xor_sync(0xffffffff, acc[j], o);
    float mn = fmaxf(m, m2);
    if (mn != -INFINITY) {
      float c1 = __expf(m - mn), c2 = __expf(m2 - mn);
      l = l * c1 + l2 * c2;
#pragma unroll
      for (int j = 0; j < 8; j++) acc[j] = acc[j] * c1 + a2[j] * c2;
      m = mn;
    }
  }
  if (g == 0) {
#pragma unroll
    for (int j = 0; j < 8; j++) sacc[warp][gl * 8 + j] = acc[j];
    if (gl == 0) { sm[warp] = m; sl[warp] = l; }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < HD; c += blockDim.x) {
    float mx = -INFINITY;
    for (int w = 0; w < warps; w++) mx = fmaxf(mx, sm[w]);
    float num = 0.f, den = 0.f;
    for (int w = 0; w < warps; w++) {
      if (sm[w] == -INFINITY) continue;
      float f = __expf(sm[w] - mx);
      num += sacc[w][c] * f;
      den += sl[w] * f;
    }
    out[((size_t)i * heads + h) * HD + c] = from_f<T>(num / den);
  }
}

#define KV_WRITE(NAME, T)                                                                          \
  extern "C" __global__ void NAME(T* pool, const T* qkv, const uint32_t* meta, int heads, int hd, \
                                  int rot, float base) {                                           \
    kv_write<T>(pool, qkv, meta, heads, hd, rot, base);                                            \
  }
KV_WRITE(kv_write_f32, float)
KV_WRITE(kv_write_bf16, __nv_bfloat16)
KV_WRITE(kv_write_f16, __half)

#define ATTN(NAME, T, HD)                                                                           \
  extern "C" __global__ void NAME(T* out, const T* qkv, const T* pool, const uint32_t* index, int n, \
                                  int heads, int rot, float base, int page_size, int max_pages,     \
                                  float scale) {                                                    \
    paged_attn<T, HD>(out, qkv, pool, index, n, heads, rot, base, page_size, max_pages, scale);    \
  }
#define ATTN_ALL(HD)                            \
  ATTN(paged_attn_f32_##HD, float, HD)          \
  ATTN(paged_attn_bf16_##HD, __nv_bfloat16, HD) \
  ATTN(paged_attn_f16_##HD, __half, HD)
ATTN_ALL(16)
ATTN_ALL(32)
ATTN_ALL(64)
ATTN_ALL(128)
ATTN_ALL(256)
