// Paged key/value cache kernels for the GPT-NeoX stacks (block decoder, token
// decoder, vanilla LM). The CPU versions in src/paged/cpu.rs compute the same
// functions; the fixture tests hold both to the reference.
//
// Layouts (contiguous within a row; the rows of qkv and out lie `qld` and
// `old` elements apart, more than their length when both are column ranges
// of the fused layer's row buffer, src/fused_layer.rs):
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


// Eight consecutive elements as loaded, converted later (a load in flight
// while other work runs): 32 bytes of f32, 16 of a 2-byte type.
template <typename T> struct Raw8 {
  uint4 r[sizeof(T) / 2];
  __device__ __forceinline__ void load(const T* p) {
#pragma unroll
    for (int i = 0; i < (int)sizeof(T) / 2; i++) r[i] = reinterpret_cast<const uint4*>(p)[i];
  }
  __device__ __forceinline__ void to_float(float* o) const {
    const T* e = reinterpret_cast<const T*>(r);
#pragma unroll
    for (int j = 0; j < 8; j++) o[j] = to_f(e[j]);
  }
};

// Rotary frequency of pair i (of rot / 2), as the host's table computes it.
__device__ __forceinline__ float rope_freq(int i, int rot, float base) {
  return 1.0f / powf(base, (float)(2 * i) / (float)rot);
}

// Channel c of a rotated head vector x (first `rot` channels rotate-half),
// with the frequencies from `inv` (rope_table) when given, else computed here.
template <typename T>
__device__ __forceinline__ float rope_at(const T* x, int c, int rot, int pos, float base, const float* inv = nullptr) {
  float v = to_f(x[c]);
  if (c >= rot) return v;
  int half = rot / 2;
  int i = c < half ? c : c - half;
  float s, co;
  sincosf((float)pos * (inv ? inv[i] : rope_freq(i, rot, base)), &s, &co);
  return c < half ? v * co - to_f(x[c + half]) * s : v * co + to_f(x[c - half]) * s;
}

// The CTA's table of rotary frequencies (rot / 2 <= HD / 2 entries): one powf
// per pair per CTA instead of one per rotated element (the powf dominated the
// prefill KV write and the tensor-core kernel's query loads). The caller
// synchronises before reading it.
__device__ __forceinline__ void rope_table(float* inv, int rot, float base) {
  for (int i = threadIdx.x; i < rot / 2; i += blockDim.x) inv[i] = rope_freq(i, rot, base);
}

// Grid (n, ceil(heads * hd / 8 / blockDim.x)), one thread per eight channels of
// a head: rotate k, copy v, into the token's slot. (A CTA per head and token
// made the token decoder's writes, a few KB each, 24k tiny CTAs: 22 us a layer
// on an H200.) head_dim is a multiple of 8, rows start 16-byte aligned.
template <typename T>
__device__ void kv_write(T* pool, const T* qkv, const uint32_t* meta, int heads, int hd, int rot, float base, int qld) {
  constexpr int N = VecOf<T>::N;
  __shared__ float inv[128];  // head_dim <= 256
  rope_table(inv, rot, base);
  __syncthreads();
  const int i = blockIdx.x, e = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
  if (e >= heads * hd) return;
  const int h = e / hd, c0 = e % hd;
  const uint32_t slot = meta[3 * i], pos = meta[3 * i + 1];
  const T* k = qkv + (size_t)i * qld + h * 3 * hd + hd;
  T* dst = pool + ((size_t)slot * 2 * heads + h) * hd;
#pragma unroll
  for (int v = 0; v < 8 / N; v++) {
    Vec<T> kv = load_vec(k + c0 + v * N);
    if (c0 < rot) {
#pragma unroll
      for (int j = 0; j < N; j++) kv.e[j] = from_f<T>(rope_at(k, c0 + v * N + j, rot, pos, base, inv));
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

// Grid (query groups x heads), heads fastest; block 32 * warps threads. Softmax attention of each
// token's rotated, scaled query over keys 0..=pos of its row. Lanes work in
// groups of G = HD / 8, one key per group and eight channels per lane; each group
// keeps an online softmax per query, merged across groups by shuffles and across
// warps in shared memory. Scores and softmax in f32.
template <typename T, int HD, int QB, int PF = 1>
__device__ void paged_attn(T* out, const T* qkv, const T* pool, const uint32_t* index, int n, int heads,
                           int rot, float base, int page_size, int max_pages, int rows, float scale, int subs,
                           int qld, int old, int write = 0, T* act = nullptr, int act_w = 0) {
  constexpr int G = HD / 8;
  constexpr int KP = 32 / G;
  // Heads vary fastest across the grid: the CTAs resident together read all
  // heads of the same slots (whole 3 KB slots of b4_85, not one head's 128 B
  // of many slots), which DRAM serves far better.
  const int h = blockIdx.x % heads, cta = blockIdx.x / heads;
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / G, gl = lane % G;
  const uint32_t* groups = index + 3 * (size_t)n + (size_t)rows * max_pages;
  // A group of up to 64 tokens spans `subs` CTAs of QB tokens each.
  const int gi = cta / subs, sub = cta % subs;
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
    const T* q = qkv + (size_t)(first + j) * qld + h * 3 * HD;
    qs[j][c] = j < count ? rope_at(q, c, rot, pos0 + j, base) * scale : 0.f;
  }
  if (act) {
    // The fused layer's decode passes: GELU in place on this head's share
    // (act_w columns) of the token's MLP hidden row, which lies in the same
    // row buffer as qkv, so that no launch of its own runs between the
    // projection GEMM and attention (a few microseconds and a gap a layer).
    T* a = act + (size_t)first * qld + (size_t)h * act_w;
    for (int c = threadIdx.x * VecOf<T>::N; c < act_w; c += blockDim.x * VecOf<T>::N) gelu_vec(a + c);
  }
  if (write) {
    // Decode (one token a CTA): store this head's rotated key and value of
    // the token into its slot, as kv_write does, instead of a launch of its
    // own; the barrier below puts the stores before any warp reads the
    // row's keys. (The pool is written through the const pointer every
    // kernel of the family takes.)
    T* slot = const_cast<T*>(pool) + ((size_t)index[3 * first] * 2 * heads + h) * HD;
    const T* k = qkv + (size_t)first * qld + h * 3 * HD + HD;
    for (int c = threadIdx.x; c < HD; c += blockDim.x) {
      slot[c] = from_f<T>(rope_at(k, c, rot, pos0, base));
      slot[(size_t)heads * HD + c] = k[HD + c];
    }
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
  // The key and value of the next PF rounds are loaded before this round's
  // scores, into registers: round r's in buffer r % PF, the rounds unrolled
  // PF at a time to keep the buffers in registers. One layer's decode
  // attention at batch 256 over 1,152 keys (vanilla_160's heads) on an H200
  // read about 3.5 TB/s with no round ahead, 3.58-3.62 with PF = 1 and
  // 3.84-3.86 with PF = 2 (64 registers, 8 CTAs a multiprocessor); PF = 3
  // takes 79 registers, 6 CTAs, and read 3.69. A ring in shared memory
  // filled by cp.async instead of registers read about 2.0.
  const int stride = warps * KP;
  Raw8<T> kn[PF], vn[PF];
  auto fetch = [&](Raw8<T>& kb, Raw8<T>& vb, int key) {
    if (key < nkeys) {
      uint32_t slot = table[key / page_size] * (uint32_t)page_size + key % page_size;
      const T* kp = pool + ((size_t)slot * 2 * heads + h) * HD + gl * 8;
      kb.load(kp);
      vb.load(kp + (size_t)heads * HD);
    }
  };
#pragma unroll
  for (int p = 0; p < PF; p++) fetch(kn[p], vn[p], warp * KP + p * stride + g);
  for (int round0 = warp * KP; round0 < nkeys; round0 += PF * stride) {
#pragma unroll
    for (int p = 0; p < PF; p++) {
      const int base_key = round0 + p * stride;  // the same in every lane of the warp
      if (base_key >= nkeys) break;
      const int key = base_key + g;
      const bool valid = key < nkeys;
      float s[QB];
      float kf[8], vf[8];
      kn[p].to_float(kf);
      vn[p].to_float(vf);
      fetch(kn[p], vn[p], key + PF * stride);
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
          float corr = __expf(m[j] - mn), e = __expf(s[j] - mn);
          l[j] = l[j] * corr + e;
#pragma unroll
          for (int c = 0; c < 8; c++) acc[j][c] = acc[j][c] * corr + e * vf[c];
          m[j] = mn;
        }
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
    out[(size_t)(first + j) * old + h * HD + c] = from_f<T>(num / den);
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
                           float base, int page_size, int max_pages, float scale, int write, int qld, int old) {
  constexpr int C = HD / 32;
  const int item = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (item >= n * heads) return;  // whole warps: n * heads is the warp count
  const int i = item / heads, h = item % heads;
  const int pos = index[3 * i + 1], row = index[3 * i + 2];
  const uint32_t* table = index + 3 * (size_t)n + (size_t)row * max_pages;
  const T* q = qkv + (size_t)i * qld + h * 3 * HD;
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
  T* o = out + (size_t)i * old + h * HD + lane * C;
#pragma unroll
  for (int c = 0; c < C; c++) o[c] = from_f<T>(acc[c] / l);
}

#define LOCAL(NAME, T, HD)                                                                                   \
  extern "C" __global__ void NAME(T* out, const T* qkv, T* pool, const uint32_t* index, int n, int heads,   \
                                  int rot, float base, int page_size, int max_pages, float scale, int write,  \
                                  int qld, int old) {                                                         \
    local_attn<T, HD>(out, qkv, pool, index, n, heads, rot, base, page_size, max_pages, scale, write, qld, old); \
  }
#define LOCAL_ALL(HD)                                \
  LOCAL(local_attn_f32_##HD, float, HD)              \
  LOCAL(local_attn_bf16_##HD, __nv_bfloat16, HD)     \
  LOCAL(local_attn_f16_##HD, __half, HD)
LOCAL_ALL(32)
LOCAL_ALL(64)
LOCAL_ALL(128)

// Tensor-core attention for prefill groups (bf16/f16, 16-position pages), in
// the manner of FlashAttention-2. A CTA of four warps takes one query group (up
// to 64 consecutive tokens of one row) and one head; warp w holds tokens
// 16w..16w+15. Tiles of KT keys (KT / 16 pages) are copied into shared memory
// with cp.async, the next tile while the current one is used, and all four
// warps share them. S = Q K^T and O += P V run on mma.sync m16n8k16; the
// scores, the online softmax and the output stay in registers (the layout of
// an S accumulator pair is the layout of P as the A operand of P V). The
// earlier one-warp WMMA kernel reloaded its output from shared memory on every
// 16-key page and ran prefill attention at about 15 TFLOP/s. One layer over 32
// prompts of 512 positions, with its KV write, takes 0.165 ms on an H200
// (0.288 before the shared query and output staging, the per-CTA rotary
// table, the mask on diagonal tiles only and four CTAs a multiprocessor).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared; `bytes` 0 fills the 16 bytes with zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// c += a b for one 16x8 tile, f32 accumulators.
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, __nv_bfloat16) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, __half) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Two floats as one register of two 2-byte values (the lower column in the low half).
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

#define TC_WARPS 4
// At head_dim 64, four CTAs a multiprocessor (at most 128 registers a thread;
// 37 KB of shared memory each): with three, as the compiler chose (136
// registers), warps waited on each other's loads most of the time (Nsight
// Compute on an H200: no eligible warp 61% of cycles). The `tc3` kernels keep
// the compiler's choice, for A/B runs (BLOCKSERVE_PREFILL_ATTENTION=tc3). At
// head_dim 128 a bound of four spills about 1 KB a thread, so it has none.
#define TC_MIN_CTAS 4
template <typename T, int HD>
__device__ void paged_attn_tc(T* out, const T* qkv, const T* pool, const uint32_t* index, int n, int heads, int rot,
                              float base, int max_pages, int rows, float scale, int qld, int old) {
  constexpr int KT = HD == 64 ? 64 : 32;  // keys per tile: 36 KB of double-buffered K and V
  constexpr int LD = HD + 8;              // padded shared row: ldmatrix rows fall in distinct banks
  constexpr int NT = KT / 8, OT = HD / 8, KS = HD / 16;
  constexpr float LOG2E = 1.4426950408889634f;
  // Buffer b holds K at sm + 2b KT LD and V right after. The group's queries
  // (64 rows) wait in buffer 1 until its first keys arrive, and each warp's
  // output rows pass through buffer 0 on their way out: both then move as
  // whole 16-byte pieces, not as 2-byte loads and 4-byte stores spread over
  // rows (Nsight Compute: 44% of the sectors were excess).
  __shared__ __align__(16) T sm[4 * KT * LD];
  __shared__ float inv[HD / 2];
  static_assert(2 * KT >= 64, "a buffer holds the group's 64 query rows");
  const T tag{};
  // Heads vary fastest across the grid (as in paged_attn).
  const int h = blockIdx.x % heads, gi = blockIdx.x / heads, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const uint32_t* groups = index + 3 * (size_t)n + (size_t)rows * max_pages;
  const int first = groups[2 * gi], count = groups[2 * gi + 1];
  const int pos0 = index[3 * first + 1], row = index[3 * first + 2];
  const uint32_t* table = index + 3 * (size_t)n + (size_t)row * max_pages;
  const int last = pos0 + count - 1;  // the group's last position: keys 0..=last
  const size_t ld = 2 * (size_t)heads * HD;  // elements between consecutive slots
  const int tiles = last / KT + 1;

  // Keys and values of tile `tile` into buffer `buf`; positions past `last`
  // are zero-filled (their page may not exist). A thread copies the same 16
  // bytes (channels ch..ch+7) of keys key0, key0 + KPI, ...
  constexpr int CPK = HD / 8, KPI = 32 * TC_WARPS / CPK;
  const int key0 = tid / CPK, ch = (tid % CPK) * 8;
  const T* col = pool + (size_t)h * HD + ch;
  auto load_tile = [&](int tile, int buf) {
#pragma unroll
    for (int key = key0; key < KT; key += KPI) {
      const int pos = tile * KT + key;
      const bool ok = pos <= last;
      const T* k = col + (ok ? ((size_t)table[pos >> 4] * 16 + (pos & 15)) * ld : 0);
      T* kv = sm + 2 * buf * KT * LD + key * LD + ch;
      cp_async16(kv, k, ok ? 16 : 0);
      cp_async16(kv + KT * LD, k + (ok ? (size_t)heads * HD : 0), ok ? 16 : 0);
    }
    cp_async_commit();
  };
  // The queries as projected (rows past `count` zero-filled), then the first tile.
  T* qs = sm + 2 * KT * LD;
  for (int c = tid; c < 64 * CPK; c += 32 * TC_WARPS) {
    const int j = c / CPK, cc = (c % CPK) * 8;
    const bool ok = j < count;
    cp_async16(qs + j * LD + cc, qkv + (size_t)(first + (ok ? j : 0)) * qld + h * 3 * HD + cc, ok ? 16 : 0);
  }
  cp_async_commit();
  load_tile(0, 0);
  rope_table(inv, rot, base);
  cp_async_wait<1>();  // the queries; the first tile may still be in flight
  __syncthreads();

  // This warp's query rows: qa and qb = qa + 8 of the group (fragment rows g, g + 8).
  const int q0 = warp * 16, qa = q0 + g, qb = qa + 8;
  const bool active = q0 < count;
  // Each row's last visible key (-1: not a query of the group).
  const int lim_a = qa < count ? pos0 + qa : -1, lim_b = qb < count ? pos0 + qb : -1;
  const int warp_last = pos0 + min(count, q0 + 16) - 1;
  // Rotated, scaled queries as A fragments (rows g / g + 8, channel pairs 2 t4 (+8)).
  uint32_t qf[KS][4];
  const int half = rot / 2;
  if (half % 8 == 0) {
    // Rotate and scale in place, 8 channels a step; the thread that takes a
    // first-half piece also takes its partner (same angles), then ldmatrix.
    for (int c = tid; c < 64 * CPK; c += 32 * TC_WARPS) {
      const int j = c / CPK, c0 = (c % CPK) * 8;
      if (c0 >= half && c0 < rot) continue;
      T* x = qs + j * LD + c0;
      float a[8], b[8];
      Raw8<T> ra;
      ra.load(x);
      ra.to_float(a);
      if (c0 < half) {
        Raw8<T> rb;
        rb.load(x + half);
        rb.to_float(b);
#pragma unroll
        for (int e = 0; e < 8; e++) {
          float sn, cs;
          sincosf((float)(pos0 + j) * inv[c0 + e], &sn, &cs);
          const float xa = a[e], xb = b[e];
          a[e] = (xa * cs - xb * sn) * scale;
          b[e] = (xb * cs + xa * sn) * scale;
        }
        uint4 wb = {pack2(b[0], b[1], tag), pack2(b[2], b[3], tag), pack2(b[4], b[5], tag), pack2(b[6], b[7], tag)};
        *reinterpret_cast<uint4*>(x + half) = wb;
      } else {
#pragma unroll
        for (int e = 0; e < 8; e++) a[e] *= scale;
      }
      uint4 wa = {pack2(a[0], a[1], tag), pack2(a[2], a[3], tag), pack2(a[4], a[5], tag), pack2(a[6], a[7], tag)};
      *reinterpret_cast<uint4*>(x) = wa;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KS; kk++) ldmatrix_x4(qf[kk], qs + (q0 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
  } else {
    // Other rotary widths: element by element from the shared copy.
#pragma unroll
    for (int kk = 0; kk < KS; kk++)
#pragma unroll
      for (int r = 0; r < 4; r++) {
        const int j = (r & 1) ? qb : qa, ch = kk * 16 + (r >> 1) * 8 + 2 * t4;
        const T* q = qs + j * LD;
        qf[kk][r] = pack2(rope_at(q, ch, rot, pos0 + j, base, inv) * scale, rope_at(q, ch + 1, rot, pos0 + j, base, inv) * scale, tag);
      }
  }
  __syncthreads();  // buffer 1 takes the second tile next

  float o[OT][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
  for (int t = 0; t < OT; t++) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;

  for (int tile = 0; tile < tiles; tile++) {
    const int buf = tile & 1;
    if (tile + 1 < tiles) {
      load_tile(tile + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (active && tile * KT <= warp_last) {
      const T* kt = sm + 2 * buf * KT * LD;
      const T* vt = kt + KT * LD;
      float s[NT][4];
#pragma unroll
      for (int t = 0; t < NT; t++) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
      // S = Q K^T, two 8-key tiles per ldmatrix.
#pragma unroll
      for (int t2 = 0; t2 < NT / 2; t2++)
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
          uint32_t b[4];
          ldmatrix_x4(b, kt + (t2 * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
          mma16816(s[2 * t2], qf[kk], b[0], b[1], tag);
          mma16816(s[2 * t2 + 1], qf[kk], b[2], b[3], tag);
        }
      // Causal mask and the online softmax (rows qa: elements 0, 1; qb: 2, 3;
      // a row's values are spread over the four lanes of a quad). Only a tile
      // with keys past the warp's first row needs the mask: every earlier key
      // is visible to all its rows. (Rows past the group's end then see
      // finite scores of a zero query; their output is not written.)
      float mx[2] = {-INFINITY, -INFINITY};
      if (tile * KT + KT - 1 > pos0 + q0) {
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const int key = tile * KT + t * 8 + 2 * t4 + (e & 1);
            if (key > ((e >> 1) ? lim_b : lim_a)) s[t][e] = -INFINITY;
          }
      }
#pragma unroll
      for (int t = 0; t < NT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) mx[e >> 1] = fmaxf(mx[e >> 1], s[t][e]);
      float corr[2], ml[2];
#pragma unroll
      for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
        const float mn = fmaxf(m[r], mx[r]);
        corr[r] = mn == -INFINITY ? 1.f : exp2f((m[r] - mn) * LOG2E);
        m[r] = mn;
        ml[r] = mn == -INFINITY ? 0.f : mn * LOG2E;
        l[r] *= corr[r];
      }
#pragma unroll
      for (int t = 0; t < NT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const float p = exp2f(fmaf(s[t][e], LOG2E, -ml[e >> 1]));  // exp2(-inf) = 0 for masked keys
          s[t][e] = p;
          l[e >> 1] += p;
        }
#pragma unroll
      for (int t = 0; t < OT; t++) {
        o[t][0] *= corr[0];
        o[t][1] *= corr[0];
        o[t][2] *= corr[1];
        o[t][3] *= corr[1];
      }
      // O += P V, 16 keys per step, two 8-channel tiles per ldmatrix.
#pragma unroll
      for (int kk = 0; kk < KT / 16; kk++) {
        const uint32_t pa[4] = {pack2(s[2 * kk][0], s[2 * kk][1], tag), pack2(s[2 * kk][2], s[2 * kk][3], tag),
                                pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], tag), pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], tag)};
#pragma unroll
        for (int t2 = 0; t2 < OT / 2; t2++) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, vt + (kk * 16 + (lane & 15)) * LD + t2 * 16 + (lane >> 4) * 8);
          mma16816(o[2 * t2], pa, b[0], b[1], tag);
          mma16816(o[2 * t2 + 1], pa, b[2], b[3], tag);
        }
      }
    }
    __syncthreads();  // the buffer is refilled by the next iteration's copy
  }
  if (!active) return;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
    l[r] = 1.f / l[r];
  }
  // The warp's 16 rows through shared memory (the loop ended on a barrier:
  // every buffer is free), then out in 16-byte pieces.
  T* os = sm + q0 * LD;
#pragma unroll
  for (int t = 0; t < OT; t++) {
    const int ch = t * 8 + 2 * t4;
    *reinterpret_cast<uint32_t*>(os + g * LD + ch) = pack2(o[t][0] * l[0], o[t][1] * l[0], tag);
    *reinterpret_cast<uint32_t*>(os + (g + 8) * LD + ch) = pack2(o[t][2] * l[1], o[t][3] * l[1], tag);
  }
  __syncwarp();
#pragma unroll
  for (int c = lane; c < 16 * CPK; c += 32) {
    const int r = c / CPK, cc = (c % CPK) * 8;
    if (q0 + r < count)
      *reinterpret_cast<uint4*>(out + (size_t)(first + q0 + r) * old + h * HD + cc) = *reinterpret_cast<const uint4*>(os + r * LD + cc);
  }
}

// BOUNDS: TC_BOUNDS, or nothing for the compiler's own choice.
#define TC_BOUNDS __launch_bounds__(32 * TC_WARPS, TC_MIN_CTAS)
#define ATTN_TC(NAME, T, HD, BOUNDS)                                                                      \
  extern "C" __global__ void BOUNDS NAME(T* out, const T* qkv, const T* pool, const uint32_t* index, int n, \
                                         int heads, int rot, float base, int page_size, int max_pages,    \
                                         int rows, float scale, int subs, int qld, int old) {             \
    paged_attn_tc<T, HD>(out, qkv, pool, index, n, heads, rot, base, max_pages, rows, scale, qld, old);   \
  }
ATTN_TC(paged_attn_tc_bf16_64, __nv_bfloat16, 64, TC_BOUNDS)
ATTN_TC(paged_attn_tc_f16_64, __half, 64, TC_BOUNDS)
ATTN_TC(paged_attn_tc3_bf16_64, __nv_bfloat16, 64, )
ATTN_TC(paged_attn_tc3_f16_64, __half, 64, )
ATTN_TC(paged_attn_tc_bf16_128, __nv_bfloat16, 128, )
ATTN_TC(paged_attn_tc_f16_128, __half, 128, )

#define KV_WRITE(NAME, T)                                                                          \
  extern "C" __global__ void NAME(T* pool, const T* qkv, const uint32_t* meta, int heads, int hd, \
                                  int rot, float base, int qld) {                                  \
    kv_write<T>(pool, qkv, meta, heads, hd, rot, base, qld);                                       \
  }
KV_WRITE(kv_write_f32, float)
KV_WRITE(kv_write_bf16, __nv_bfloat16)
KV_WRITE(kv_write_f16, __half)

#define ATTN_PF(NAME, T, HD, QB, PF)                                                                \
  extern "C" __global__ void NAME(T* out, const T* qkv, const T* pool, const uint32_t* index, int n, \
                                  int heads, int rot, float base, int page_size, int max_pages,     \
                                  int rows, float scale, int subs, int qld, int old) {              \
    paged_attn<T, HD, QB, PF>(out, qkv, pool, index, n, heads, rot, base, page_size, max_pages,     \
                              rows, scale, subs, qld, old);                                         \
  }
#define ATTN(NAME, T, HD, QB) ATTN_PF(NAME, T, HD, QB, 1)
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
// Decode passes (one query a row) in 2-byte dtypes, two rounds ahead; each
// CTA also stores its token's key and value of its head, and with `act` runs
// GELU over its head's share of the token's MLP hidden row (the fused layer's).
#define ATTN_DECODE1(NAME, T, HD)                                                                    \
  extern "C" __global__ void NAME(T* out, const T* qkv, const T* pool, const uint32_t* index, int n, \
                                  int heads, int rot, float base, int page_size, int max_pages,     \
                                  int rows, float scale, int subs, int qld, int old, T* act,        \
                                  int act_w) {                                                      \
    paged_attn<T, HD, 1, 2>(out, qkv, pool, index, n, heads, rot, base, page_size, max_pages, rows, \
                            scale, subs, qld, old, 1, act, act_w);                                  \
  }
#define ATTN_DECODE(HD)                                    \
  ATTN_DECODE1(paged_attn1p2_bf16_##HD, __nv_bfloat16, HD) \
  ATTN_DECODE1(paged_attn1p2_f16_##HD, __half, HD)
ATTN_DECODE(64)
ATTN_DECODE(128)

// Decode passes over long rows (every row adds one token, 2-byte dtypes) in
// batches that fill the GPU. The per-head kernel above reads each key as
// `heads` separate 128-byte pieces from `heads` CTAs. Here a CTA covers all
// heads of one token, so a key's whole slot (K of every head, then V: 2 * heads
// * HD contiguous elements) is one warp's cp.async into shared memory, with
// DR_STAGES - 1 keys in flight per warp and no registers spent holding them.
// Warp w of the CTA takes keys w, w + warps, ... Lane l holds 8-channel pieces
// l + 32 r (r < R) of the query: head (l + 32 r) / G; a head's G lanes are
// consecutive, so its score is a shuffle reduction over them. Warps merge in
// shared memory.
//
// On an H200 (vanilla_160's heads, 1152 keys a row) this reads 4,102 GB/s at
// batch 1024 against the per-head kernel's 3,974 (torch's sum reads 4,176).
// Below a full wave of CTAs it loses: at batch 256 it read 3,247 GB/s, and
// 3,421 at best with a row's keys split over CTAs and merged by a second
// kernel, against 3,650 per head; and 3,583 at best with a CTA per group of
// heads (three groups of four), against 3,721 per head in the same call. So
// small batches stay per head.
//
// Grid n, block 32 * warps; dynamic shared memory warps * DR_STAGES * slot
// bytes (the host keeps it at most 48 KB).
#define DR_STAGES 4
template <typename T, int HD, int R>
__device__ void decode_rows(T* out, const T* qkv, const T* pool, const uint32_t* index, int n, int heads, int rot,
                            float base, int page_size, int max_pages, float scale, int qld, int old) {
  constexpr int G = HD / 8;  // lanes (pieces) per head
  extern __shared__ __align__(16) unsigned char dsm[];
  const int i = blockIdx.x;
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int pieces = heads * G;      // 16-byte pieces of one slot's K (and of its V)
  const int slot16 = 2 * pieces;     // 16-byte pieces of a whole slot
  const int pos = index[3 * i + 1], row = index[3 * i + 2];
  const uint32_t* table = index + 3 * (size_t)n + (size_t)row * max_pages;
  const int nkeys = pos + 1;
  uint4* ring = reinterpret_cast<uint4*>(dsm) + (size_t)warp * DR_STAGES * slot16;

  float q[R][8], m[R], l[R], acc[R][8];
#pragma unroll
  for (int r = 0; r < R; r++) {
    const int c = lane + 32 * r;
    const T* qp = qkv + (size_t)i * qld + (c / G) * 3 * HD;
#pragma unroll
    for (int e = 0; e < 8; e++) {
      q[r][e] = c < pieces ? rope_at(qp, (c % G) * 8 + e, rot, pos, base) * scale : 0.f;
      acc[r][e] = 0.f;
    }
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  // This warp's t-th key into stage t % DR_STAGES. A group is committed even
  // when there is no key, so that the wait counts below hold.
  auto issue = [&](int t) {
    const int key = warp + t * warps;
    if (key < nkeys) {
      const size_t slot = (size_t)table[key / page_size] * page_size + key % page_size;
      const uint4* src = reinterpret_cast<const uint4*>(pool + slot * 2 * heads * HD);
      uint4* dst = ring + (t % DR_STAGES) * slot16;
      for (int c = lane; c < slot16; c += 32) cp_async16(dst + c, src + c, 16);
    }
    cp_async_commit();
  };
  const int mine = nkeys > warp ? (nkeys - warp + warps - 1) / warps : 0;
#pragma unroll
  for (int t = 0; t < DR_STAGES - 1; t++) issue(t);
  for (int t = 0; t < mine; t++) {
    __syncwarp();  // every lane is done with the stage the next issue refills
    issue(t + DR_STAGES - 1);
    cp_async_wait<DR_STAGES - 1>();
    __syncwarp();  // other lanes' copies of key t are visible
    const uint4* s = ring + (t % DR_STAGES) * slot16;
#pragma unroll
    for (int r = 0; r < R; r++) {
      const int c = lane + 32 * r;
      float kf[8], vf[8];
      Raw8<T> k, v;
      k.r[0] = c < pieces ? s[c] : make_uint4(0, 0, 0, 0);
      v.r[0] = c < pieces ? s[pieces + c] : make_uint4(0, 0, 0, 0);
      k.to_float(kf);
      v.to_float(vf);
      float sc = 0.f;
#pragma unroll
      for (int e = 0; e < 8; e++) sc += q[r][e] * kf[e];
#pragma unroll
      for (int o = G / 2; o > 0; o /= 2) sc += __shfl_xor_sync(0xffffffff, sc, o);
      // Pieces past `pieces` (whole groups of G lanes) belong to no head and are never written.
      const float mn = fmaxf(m[r], sc), corr = __expf(m[r] - mn), p = __expf(sc - mn);
      l[r] = l[r] * corr + p;
#pragma unroll
      for (int e = 0; e < 8; e++) acc[r][e] = acc[r][e] * corr + p * vf[e];
      m[r] = mn;
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring becomes the merge scratch
  float* sm = reinterpret_cast<float*>(dsm);   // [warps][pieces]
  float* sl = sm + warps * pieces;             // [warps][pieces]
  float* sacc = sl + warps * pieces;           // [warps][pieces][8]
#pragma unroll
  for (int r = 0; r < R; r++) {
    const int c = lane + 32 * r;
    if (c < pieces) {
      sm[warp * pieces + c] = m[r];
      sl[warp * pieces + c] = l[r];
#pragma unroll
      for (int e = 0; e < 8; e++) sacc[(warp * pieces + c) * 8 + e] = acc[r][e];
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < pieces; c += blockDim.x) {
    float mx = -INFINITY;
    for (int w = 0; w < warps; w++) mx = fmaxf(mx, sm[w * pieces + c]);
    float num[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, den = 0.f;
    for (int w = 0; w < warps; w++) {
      const float mw = sm[w * pieces + c];
      if (mw == -INFINITY) continue;  // a warp with no key
      const float f = __expf(mw - mx);
      den += sl[w * pieces + c] * f;
#pragma unroll
      for (int e = 0; e < 8; e++) num[e] += sacc[(w * pieces + c) * 8 + e] * f;
    }
    T* o = out + (size_t)i * old + (c / G) * HD + (c % G) * 8;
#pragma unroll
    for (int e = 0; e < 8; e++) o[e] = from_f<T>(num[e] / den);
  }
}

#define DECODE(NAME, T, HD, R)                                                                         \
  extern "C" __global__ void NAME(T* out, const T* qkv, const T* pool, const uint32_t* index, int n,     \
                                  int heads, int rot, float base, int page_size, int max_pages, float scale,   \
                                  int qld, int old) {                                                          \
    decode_rows<T, HD, R>(out, qkv, pool, index, n, heads, rot, base, page_size, max_pages, scale, qld, old); \
  }
#define DECODE_R(HD, R)                                      \
  DECODE(decode_rows_bf16_##HD##_##R, __nv_bfloat16, HD, R) \
  DECODE(decode_rows_f16_##HD##_##R, __half, HD, R)
DECODE_R(64, 1)
DECODE_R(64, 2)
DECODE_R(64, 3)
DECODE_R(64, 4)
DECODE_R(128, 1)
DECODE_R(128, 2)
DECODE_R(128, 3)
DECODE_R(128, 4)
