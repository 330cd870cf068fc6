// Paged key/value cache kernels for the GPT-NeoX stacks (block decoder, token
// decoder, vanilla LM). The CPU versions in src/paged/cpu.rs compute the same
// functions; the fixture tests hold both to the reference.
//
// Layouts (all contiguous):
//   qkv   [n, heads, 3, head_dim]   the fused projection, per head [q|k|v]
//   pool  [slots, 2, heads, head_dim] slot = page * page_size + offset; K then V
//   index u32: meta [n, 3] = (slot, position, table row) of each new token,
//         then tables [rows, max_pages] = each row's pages in order,
//         then query groups [groups, 2] = (first token, count <= QB): runs of
//         consecutive tokens of one row, attended together
//   out   [n, heads * head_dim]
// Rotary (rotate-half over the first `rot` channels) is applied to q and k here,
// with the angles computed in f32 exactly as the host's table is.
#include "common.cuh"


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

// Grid (n, ceil(heads * hd / 8 / blockDim.x)), one thread per eight channels of
// a head: rotate k, copy v, into the token's slot. (A CTA per head and token
// made the token decoder's writes, a few KB each, 24k tiny CTAs: 22 us a layer
// on an H200.) head_dim is a multiple of 8, rows start 16-byte aligned.
template <typename T>
__device__ void kv_write(T* pool, const T* qkv, const uint32_t* meta, int heads, int hd, int rot, float base) {
  constexpr int N = VecOf<T>::N;
  const int i = blockIdx.x, e = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
  if (e >= heads * hd) return;
  const int h = e / hd, c0 = e % hd;
  const uint32_t slot = meta[3 * i], pos = meta[3 * i + 1];
  const T* k = qkv + ((size_t)i * heads + h) * 3 * hd + hd;
  T* dst = pool + ((size_t)slot * 2 * heads + h) * hd;
#pragma unroll
  for (int v = 0; v < 8 / N; v++) {
    Vec<T> kv = load_vec(k + c0 + v * N);
    if (c0 < rot) {
#pragma unroll
      for (int j = 0; j < N; j++) kv.e[j] = from_f<T>(rope_at(k, c0 + v * N + j, rot, pos, base));
    }
    store_vec(dst + c0 + v * N, kv);
    store_vec(dst + (size_t)heads * hd + c0 + v * N, load_vec(k + hd + c0 + v * N));
  }
}

#define MAX_WARPS 4
// QB queries per CTA: consecutive new tokens of one row share every key and
// value load (prefill chunks use QB = 4, the token decoder's two prefix
// positions QB = 2; decode rows, groups of one, use QB = 1 for its lower
// register count).

// Grid (query groups, heads), block 32 * warps threads. Softmax attention of each
// token's rotated, scaled query over keys 0..=pos of its row. Lanes work in
// groups of G = HD / 8, one key per group and eight channels per lane; each group
// keeps an online softmax per query, merged across groups by shuffles and across
// warps in shared memory. Scores and softmax in f32.
template <typename T, int HD, int QB>
__device__ void paged_attn(T* out, const T* qkv, const T* pool, const uint32_t* index, int n, int heads,
                           int rot, float base, int page_size, int max_pages, int rows, float scale, int subs) {
  constexpr int G = HD / 8;
  constexpr int KP = 32 / G;
  const int h = blockIdx.y;
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / G, gl = lane % G;
  const uint32_t* groups = index + 3 * (size_t)n + (size_t)rows * max_pages;
  // A group of up to 16 tokens spans `subs` CTAs of QB tokens each.
  const int gi = blockIdx.x / subs, sub = blockIdx.x % subs;
  const int first = groups[2 * gi] + sub * QB, count = min(QB, (int)groups[2 * gi + 1] - sub * QB);
  if (count <= 0) return;
  const uint32_t pos0 = index[3 * first + 1], row = index[3 * first + 2];
  const uint32_t* table = index + 3 * (size_t)n + (size_t)row * max_pages;
  const int nkeys = pos0 + count;  // keys of the last query in the group

  __shared__ float qs[QB][HD];
  __shared__ float sm[MAX_WARPS][QB], sl[MAX_WARPS][QB];
  __shared__ float sacc[MAX_WARPS][QB][HD];
  for (int e = threadIdx.x; e < QB * HD; e += blockDim.x) {
    int j = e / HD, c = e % HD;
    const T* q = qkv + ((size_t)(first + j) * heads + h) * 3 * HD;
    qs[j][c] = j < count ? rope_at(q, c, rot, pos0 + j, base) * scale : 0.f;
  }
  __syncthreads();
  float qr[QB][8];
#pragma unroll
  for (int j = 0; j < QB; j++)
#pragma unroll
    for (int c = 0; c < 8; c++) qr[j][c] = qs[j][gl * 8 + c];

  float m[QB], l[QB], acc[QB][8];
#pragma unroll
  for (int j = 0; j < QB; j++) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int c = 0; c < 8; c++) acc[j][c] = 0.f;
  }
  for (int base_key = warp * KP; base_key < nkeys; base_key += warps * KP) {
    const int key = base_key + g;
    const bool valid = key < nkeys;
    float s[QB];
    float kf[8], vf[8];
    if (valid) {
      uint32_t slot = table[key / page_size] * (uint32_t)page_size + key % page_size;
      const T* kp = pool + ((size_t)slot * 2 * heads + h) * HD + gl * 8;
      load8(kp, kf);
      load8(kp + (size_t)heads * HD, vf);
    }
#pragma unroll
    for (int j = 0; j < QB; j++) {
      s[j] = 0.f;
      if (valid) {
#pragma unroll
        for (int c = 0; c < 8; c++) s[j] += qr[j][c] * kf[c];
      }
#pragma unroll
      for (int o = G / 2; o > 0; o /= 2) s[j] += __shfl_xor_sync(0xffffffff, s[j], o);
    }
#pragma unroll
    for (int j = 0; j < QB; j++) {
      // Query j (position pos0 + j) sees keys 0..=pos0 + j.
      if (valid && j < count && key <= (int)pos0 + j) {
        float mn = fmaxf(m[j], s[j]);
        float corr = __expf(m[j] - mn), p = __expf(s[j] - mn);
        l[j] = l[j] * corr + p;
#pragma unroll
        for (int c = 0; c < 8; c++) acc[j][c] = acc[j][c] * corr + p * vf[c];
        m[j] = mn;
      }
    }
  }
  // Merge the groups of this warp (same channels, different keys).
#pragma unroll
  for (int o = G; o < 32; o *= 2) {
#pragma unroll
    for (int j = 0; j < QB; j++) {
      float m2 = __shfl_xor_sync(0xffffffff, m[j], o), l2 = __shfl_xor_sync(0xffffffff, l[j], o);
      float a2[8];
#pragma unroll
      for (int c = 0; c < 8; c++) a2[c] = __shfl_xor_sync(0xffffffff, acc[j][c], o);
      float mn = fmaxf(m[j], m2);
      if (mn != -INFINITY) {
        float c1 = __expf(m[j] - mn), c2 = __expf(m2 - mn);
        l[j] = l[j] * c1 + l2 * c2;
#pragma unroll
        for (int c = 0; c < 8; c++) acc[j][c] = acc[j][c] * c1 + a2[c] * c2;
        m[j] = mn;
      }
    }
  }
  if (g == 0) {
#pragma unroll
    for (int j = 0; j < QB; j++) {
#pragma unroll
      for (int c = 0; c < 8; c++) sacc[warp][j][gl * 8 + c] = acc[j][c];
      if (gl == 0) { sm[warp][j] = m[j]; sl[warp][j] = l[j]; }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < count * HD; e += blockDim.x) {
    int j = e / HD, c = e % HD;
    float mx = -INFINITY;
    for (int w = 0; w < warps; w++) mx = fmaxf(mx, sm[w][j]);
    float num = 0.f, den = 0.f;
    for (int w = 0; w < warps; w++) {
      if (sm[w][j] == -INFINITY) continue;
      float f = __expf(sm[w][j] - mx);
      num += sacc[w][j][c] * f;
      den += sl[w][j] * f;
    }
    out[((size_t)(first + j) * heads + h) * HD + c] = from_f<T>(num / den);
  }
}

// Attention over short rows (every row at most MAX_LOCAL_KEYS positions: the
// token decoder's R + L - 1 = 5). One warp per (new token, head), HD / 32
// channels per lane: the query's rotation takes its partner channel from
// another lane by shuffle, and every key and value of the row is loaded at
// once before the scores, so a warp waits for memory about three times (index,
// query and page table, keys and values). The general kernel above spent most
// of 37 us a launch of the token decoder's [2048 tokens, 12 heads] waiting on
// one dependent load after another. Scores and softmax in f32.
#define MAX_LOCAL_KEYS 8
// With `write` (every row adds one token), the warp also stores its token's
// rotated key and value into the token's slot (index[3 * i]) and attends over
// them from registers: no separate KV-write launch, and no other warp reads
// that slot in the launch.
template <typename T, int HD>
__device__ void local_attn(T* out, const T* qkv, T* pool, const uint32_t* index, int n, int heads, int rot,
                           float base, int page_size, int max_pages, float scale, int write) {
  constexpr int C = HD / 32;
  const int item = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (item >= n * heads) return;  // whole warps: n * heads is the warp count
  const int i = item / heads, h = item % heads;
  const int pos = index[3 * i + 1], row = index[3 * i + 2];
  const uint32_t* table = index + 3 * (size_t)n + (size_t)row * max_pages;
  const T* q = qkv + ((size_t)i * heads + h) * 3 * HD;
  float qv[C];
#pragma unroll
  for (int c = 0; c < C; c++) qv[c] = to_f(q[lane * C + c]);
  // Rotate-half over the first `rot` channels: channel ch pairs with ch +- half,
  // held by lane (ch +- half) / C in the same register (half is a multiple of C).
  const int half = rot / 2;
#pragma unroll
  for (int c = 0; c < C; c++) {
    const int ch = lane * C + c;
    const int partner = ch < half ? ch + half : ch - half;
    const float pv = __shfl_sync(0xffffffff, qv[c], ch < rot ? partner / C : lane);
    if (ch < rot) {
      const int f = ch < half ? ch : ch - half;
      const float inv_freq = 1.0f / powf(base, (float)(2 * f) / (float)rot);
      float sn, co;
      sincosf((float)pos * inv_freq, &sn, &co);
      qv[c] = ch < half ? qv[c] * co - pv * sn : qv[c] * co + pv * sn;
    }
    qv[c] *= scale;
  }
  float kf[MAX_LOCAL_KEYS][C], vf[MAX_LOCAL_KEYS][C];
#pragma unroll
  for (int j = 0; j < MAX_LOCAL_KEYS; j++) {
    if (write && j == pos) {
      // The same rounding as kv_write: the rotated key is stored as T.
      T* kp = pool + ((size_t)index[3 * i] * 2 * heads + h) * HD + lane * C;
#pragma unroll
      for (int c = 0; c < C; c++) {
        const T k = from_f<T>(rope_at(q + HD, lane * C + c, rot, pos, base)), v = q[2 * HD + lane * C + c];
        kp[c] = k;
        kp[(size_t)heads * HD + c] = v;
        kf[j][c] = to_f(k);
        vf[j][c] = to_f(v);
      }
    } else if (j <= pos) {
      const uint32_t slot = table[j / page_size] * (uint32_t)page_size + j % page_size;
      const T* kp = pool + ((size_t)slot * 2 * heads + h) * HD + lane * C;
#pragma unroll
      for (int c = 0; c < C; c++) {
        kf[j][c] = to_f(kp[c]);
        vf[j][c] = to_f(kp[(size_t)heads * HD + c]);
      }
    }
  }
  float sc[MAX_LOCAL_KEYS], mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < MAX_LOCAL_KEYS; j++) {
    float d = 0.f;
    if (j <= pos) {
#pragma unroll
      for (int c = 0; c < C; c++) d += qv[c] * kf[j][c];
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) d += __shfl_xor_sync(0xffffffff, d, o);
    sc[j] = d;
    if (j <= pos) mx = fmaxf(mx, d);
  }
  float l = 0.f, acc[C];
#pragma unroll
  for (int c = 0; c < C; c++) acc[c] = 0.f;
#pragma unroll
  for (int j = 0; j < MAX_LOCAL_KEYS; j++) {
    if (j <= pos) {
      const float p = __expf(sc[j] - mx);
      l += p;
#pragma unroll
      for (int c = 0; c < C; c++) acc[c] += p * vf[j][c];
    }
  }
  T* o = out + ((size_t)i * heads + h) * HD + lane * C;
#pragma unroll
  for (int c = 0; c < C; c++) o[c] = from_f<T>(acc[c] / l);
}

#define LOCAL(NAME, T, HD)                                                                                   \
  extern "C" __global__ void NAME(T* out, const T* qkv, T* pool, const uint32_t* index, int n, int heads,   \
                                  int rot, float base, int page_size, int max_pages, float scale, int write) { \
    local_attn<T, HD>(out, qkv, pool, index, n, heads, rot, base, page_size, max_pages, scale, write);         \
  }
#define LOCAL_ALL(HD)                                \
  LOCAL(local_attn_f32_##HD, float, HD)              \
  LOCAL(local_attn_bf16_##HD, __nv_bfloat16, HD)     \
  LOCAL(local_attn_f16_##HD, __half, HD)
LOCAL_ALL(32)
LOCAL_ALL(64)
LOCAL_ALL(128)

// Tensor-core attention for prefill groups (bf16/f16, 16-position pages): one
// warp per (group of up to 16 consecutive tokens of one row, head). For each
// 16-key page: S = Q K^T with WMMA (K loaded straight from the page), causal
// mask and online softmax on S in shared memory, then O += P V with WMMA.
#include <mma.h>
template <typename T, int HD>
__device__ void paged_attn_tc(T* out, const T* qkv, const T* pool, const uint32_t* index, int n, int heads, int rot,
                              float base, int max_pages, int rows, float scale) {
  using namespace nvcuda;
  const int h = blockIdx.y, lane = threadIdx.x;
  const uint32_t* groups = index + 3 * (size_t)n + (size_t)rows * max_pages;
  const int first = groups[2 * blockIdx.x], count = groups[2 * blockIdx.x + 1];
  const int pos0 = index[3 * first + 1], row = index[3 * first + 2];
  const uint32_t* table = index + 3 * (size_t)n + (size_t)row * max_pages;
  const int ld = 2 * heads * HD;  // elements between consecutive slots

  __shared__ __align__(32) T qs[16 * HD];
  __shared__ __align__(32) float ss[16 * 16];
  __shared__ __align__(32) T ps[16 * 16];
  __shared__ __align__(32) float os[16 * HD];
  __shared__ float ms[16], ls[16], cs[16];
  for (int e = lane; e < 16 * HD; e += 32) {
    int j = e / HD, c = e % HD;
    const T* q = qkv + ((size_t)(first + j) * heads + h) * 3 * HD;
    qs[e] = from_f<T>(j < count ? rope_at(q, c, rot, pos0 + j, base) * scale : 0.f);
    os[e] = 0.f;
  }
  if (lane < 16) { ms[lane] = -INFINITY; ls[lane] = 0.f; }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qa[HD / 16];
#pragma unroll
  for (int k = 0; k < HD / 16; k++) wmma::load_matrix_sync(qa[k], qs + k * 16, HD);

  const int last = pos0 + count - 1;
  for (int page = 0; page * 16 <= last; page++) {
    const T* kp = pool + ((size_t)table[page] * 16 * 2 * heads + h) * HD;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
    wmma::fill_fragment(sf, 0.f);
#pragma unroll
    for (int k = 0; k < HD / 16; k++) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kb;
      wmma::load_matrix_sync(kb, kp + k * 16, ld);
      wmma::mma_sync(sf, qa[k], kb, sf);
    }
    wmma::store_matrix_sync(ss, sf, 16, wmma::mem_row_major);
    __syncwarp();
    // Two lanes per query row, eight keys each.
    {
      const int r = lane / 2, c0 = (lane % 2) * 8;
      float v[8], mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < 8; c++) {
        int key = page * 16 + c0 + c;
        v[c] = (r < count && key <= pos0 + r) ? ss[r * 16 + c0 + c] : -INFINITY;
        mx = fmaxf(mx, v[c]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      float m_old = ms[r], m_new = fmaxf(m_old, mx);
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < 8; c++) {
        float p = m_new == -INFINITY ? 0.f : __expf(v[c] - m_new);
        sum += p;
        ps[r * 16 + c0 + c] = from_f<T>(p);
      }
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      __syncwarp();
      if (lane % 2 == 0) {
        float corr = m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
        ls[r] = ls[r] * corr + sum;
        ms[r] = m_new;
        cs[r] = corr;
      }
    }
    __syncwarp();
    for (int e = lane; e < 16 * HD; e += 32) os[e] *= cs[e / HD];
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa;
    wmma::load_matrix_sync(pa, ps, 16);
#pragma unroll
    for (int t = 0; t < HD / 16; t++) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
      wmma::load_matrix_sync(vb, kp + (size_t)heads * HD + t * 16, ld);
      wmma::load_matrix_sync(of, os + t * 16, HD, wmma::mem_row_major);
      wmma::mma_sync(of, pa, vb, of);
      wmma::store_matrix_sync(os + t * 16, of, HD, wmma::mem_row_major);
    }
    __syncwarp();
  }
  for (int e = lane; e < count * HD; e += 32) {
    int j = e / HD, c = e % HD;
    out[((size_t)(first + j) * heads + h) * HD + c] = from_f<T>(os[e] / ls[j]);
  }
}

#define ATTN_TC(NAME, T, HD)                                                                             \
  extern "C" __global__ void NAME(T* out, const T* qkv, const T* pool, const uint32_t* index, int n,     \
                                  int heads, int rot, float base, int page_size, int max_pages, int rows, \
                                  float scale, int subs) {                                               \
    paged_attn_tc<T, HD>(out, qkv, pool, index, n, heads, rot, base, max_pages, rows, scale);            \
  }
ATTN_TC(paged_attn_tc_bf16_64, __nv_bfloat16, 64)
ATTN_TC(paged_attn_tc_f16_64, __half, 64)
ATTN_TC(paged_attn_tc_bf16_128, __nv_bfloat16, 128)
ATTN_TC(paged_attn_tc_f16_128, __half, 128)

#define KV_WRITE(NAME, T)                                                                          \
  extern "C" __global__ void NAME(T* pool, const T* qkv, const uint32_t* meta, int heads, int hd, \
                                  int rot, float base) {                                           \
    kv_write<T>(pool, qkv, meta, heads, hd, rot, base);                                            \
  }
KV_WRITE(kv_write_f32, float)
KV_WRITE(kv_write_bf16, __nv_bfloat16)
KV_WRITE(kv_write_f16, __half)

#define ATTN(NAME, T, HD, QB)                                                                       \
  extern "C" __global__ void NAME(T* out, const T* qkv, const T* pool, const uint32_t* index, int n, \
                                  int heads, int rot, float base, int page_size, int max_pages,     \
                                  int rows, float scale, int subs) {                                \
    paged_attn<T, HD, QB>(out, qkv, pool, index, n, heads, rot, base, page_size, max_pages, rows,   \
                          scale, subs);                                                             \
  }
#define ATTN_ALL(HD)                                  \
  ATTN(paged_attn1_f32_##HD, float, HD, 1)            \
  ATTN(paged_attn1_bf16_##HD, __nv_bfloat16, HD, 1)   \
  ATTN(paged_attn1_f16_##HD, __half, HD, 1)           \
  ATTN(paged_attn2_f32_##HD, float, HD, 2)            \
  ATTN(paged_attn2_bf16_##HD, __nv_bfloat16, HD, 2)   \
  ATTN(paged_attn2_f16_##HD, __half, HD, 2)           \
  ATTN(paged_attn4_f32_##HD, float, HD, 4)            \
  ATTN(paged_attn4_bf16_##HD, __nv_bfloat16, HD, 4)   \
  ATTN(paged_attn4_f16_##HD, __half, HD, 4)
ATTN_ALL(16)
ATTN_ALL(32)
ATTN_ALL(64)
ATTN_ALL(128)
ATTN_ALL(256)
