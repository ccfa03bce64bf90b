// NVFP4 linear for decode (M <= 16 tokens): y[M, N] = x[M, K] @ W.T, W in the checkpoint's own packed layout.
//
// Memory bound: every weight byte is read once, straight into registers, turned into BF16 there and fed to
// mma.sync as the A operand (W rows are the MMA's M dimension, the tokens its N dimension), so nothing goes through
// shared memory but the final cross-warp sum. Works on sm_80+ (built for sm_89 Ada and sm_90 Hopper).
//
// One block owns 16 output rows; its WARPS warps split K between them. Per 128-K chunk a lane (group g = lane/4,
// t = lane%4) loads 16 bytes of row g and of row g+8 (32 codes each, K = chunk + 32t ...), 2 scale bytes of each,
// and the same 32 K of x for its token(s). The MMA's K order is free as long as A and B agree: a lane's word v holds
// codes 8v..8v+7; the dequantization pairs codes (j, j+4) into one bf16x2, so x is paired the same way with prmt.
//
// Exactness (see ops/triton/nvfp4_gemm.py): the 3 magnitude bits at bit 6 of a BF16 are v * 2^-126 (m=1 is the
// subnormal 0.5 * 2^-126); one fma.rn.bf16x2 by (scale * 2^118) gives v * scale * 2^-8 exactly; fp32 accumulation;
// the epilogue multiplies by global_scale * 2^8.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cstdint>

namespace adallm {

constexpr int kChunkK = 128;

__device__ __forceinline__ void dequant_word(uint32_t w, uint32_t s2, uint32_t (&p)[4]) {
  // p[j] = bf16x2(code j, code j+4) * scale, codes j in bits 4j..4j+3
  asm("{\n"
      ".reg .b32 t, u, z;\n"
      "mov.b32 z, 0x80008000;\n"
      "shl.b32 t, %4, 6;  and.b32 t, t, 0x01C001C0; shl.b32 u, %4, 12; and.b32 u, u, 0x80008000; or.b32 %0, t, u;\n"
      "shl.b32 t, %4, 2;  and.b32 t, t, 0x01C001C0; shl.b32 u, %4, 8;  and.b32 u, u, 0x80008000; or.b32 %1, t, u;\n"
      "shr.b32 t, %4, 2;  and.b32 t, t, 0x01C001C0; shl.b32 u, %4, 4;  and.b32 u, u, 0x80008000; or.b32 %2, t, u;\n"
      "shr.b32 t, %4, 6;  and.b32 t, t, 0x01C001C0; and.b32 u, %4, 0x80008000; or.b32 %3, t, u;\n"
      "fma.rn.bf16x2 %0, %0, %5, z;\n"
      "fma.rn.bf16x2 %1, %1, %5, z;\n"
      "fma.rn.bf16x2 %2, %2, %5, z;\n"
      "fma.rn.bf16x2 %3, %3, %5, z;\n"
      "}\n"
      : "=r"(p[0]), "=r"(p[1]), "=r"(p[2]), "=r"(p[3])
      : "r"(w), "r"(s2));
}

// E4M3 scale byte -> bf16x2 (scale * 2^118, twice); exact: a power-of-two multiple of an E4M3 value.
__device__ __forceinline__ uint32_t scale_bf16x2(uint32_t byte) {
  __nv_fp8_e4m3 f;
  f.__x = static_cast<__nv_fp8_storage_t>(byte);
  const float v = static_cast<float>(f) * 0x1p118f;
  const __nv_bfloat16 b = __float2bfloat16_rn(v);
  const uint32_t bits = static_cast<uint32_t>(__bfloat16_as_ushort(b));
  return bits | (bits << 16);
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int N_TILES>
struct Chunk {
  uint4 w_lo, w_hi;     // 4 words (32 codes) of rows g and g+8
  uint32_t s_lo, s_hi;  // 2 scale bytes of each (low byte: first 16 codes)
  uint4 x[N_TILES][4];  // x[m, k .. k+32) of this lane's token(s): 4 x 8 BF16
};

template <int N_TILES>
__device__ __forceinline__ Chunk<N_TILES> load_chunk(const uint32_t* w_lo, const uint32_t* w_hi, const uint8_t* s_lo,
                                                     const uint8_t* s_hi, const __nv_bfloat16* const (&xs)[N_TILES],
                                                     const bool (&x_ok)[N_TILES], int k) {
  Chunk<N_TILES> c;
  // x comes from L2 like the weights from memory: it is loaded as early, into the same ring
#pragma unroll
  for (int t = 0; t < N_TILES; ++t)
#pragma unroll
    for (int v = 0; v < 4; ++v)
      c.x[t][v] = x_ok[t] ? __ldg(reinterpret_cast<const uint4*>(xs[t] + k) + v) : make_uint4(0, 0, 0, 0);
  // weights stream once: don't let them evict x from L1
  c.w_lo = __ldcs(reinterpret_cast<const uint4*>(w_lo + k / 8));
  c.w_hi = __ldcs(reinterpret_cast<const uint4*>(w_hi + k / 8));
  c.s_lo = __ldg(reinterpret_cast<const uint16_t*>(s_lo + k / 16));
  c.s_hi = __ldg(reinterpret_cast<const uint16_t*>(s_hi + k / 16));
  return c;
}

template <int N_TILES, int WARPS, int DEPTH>
__global__ void __launch_bounds__(WARPS * 32) nvfp4_gemv_kernel(
    const __nv_bfloat16* __restrict__ x, const uint32_t* __restrict__ w, const uint8_t* __restrict__ s,
    const float* __restrict__ g, __nv_bfloat16* __restrict__ out, int M, int N, int K, long stride_xm,
    long stride_om) {
  __shared__ float red[WARPS][N_TILES][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int grp = lane >> 2, tig = lane & 3;
  const int row0 = blockIdx.x * 16;
  const int r_lo = min(row0 + grp, N - 1), r_hi = min(row0 + grp + 8, N - 1);  // rows past N: computed, dropped
  const uint32_t* w_lo = w + static_cast<long>(r_lo) * (K / 8);
  const uint32_t* w_hi = w + static_cast<long>(r_hi) * (K / 8);
  const uint8_t* s_lo = s + static_cast<long>(r_lo) * (K / 16);
  const uint8_t* s_hi = s + static_cast<long>(r_hi) * (K / 16);
  const __nv_bfloat16* xs[N_TILES];
  bool x_ok[N_TILES];
#pragma unroll
  for (int t = 0; t < N_TILES; ++t) {
    const int m = grp + 8 * t;
    x_ok[t] = m < M;
    xs[t] = x + static_cast<long>(x_ok[t] ? m : 0) * stride_xm;
  }

  // warp w takes chunks w, w + WARPS, ...: the block's loads in flight are adjacent runs of the same 16 rows
  const int chunks = K / kChunkK;
  const int mine = chunks > warp ? (chunks - warp + WARPS - 1) / WARPS : 0;
  const int k0 = warp * kChunkK + tig * 32, k_step = WARPS * kChunkK;
  float acc[N_TILES][4] = {};

  Chunk<N_TILES> buf[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d)
    if (d < mine) buf[d] = load_chunk(w_lo, w_hi, s_lo, s_hi, xs, x_ok, k0 + d * k_step);

  for (int i0 = 0; i0 < mine; i0 += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int i = i0 + d;
      if (i >= mine) break;
      const Chunk<N_TILES> ch = buf[d];
      if (i + DEPTH < mine) buf[d] = load_chunk(w_lo, w_hi, s_lo, s_hi, xs, x_ok, k0 + (i + DEPTH) * k_step);
      const uint32_t wl[4] = {ch.w_lo.x, ch.w_lo.y, ch.w_lo.z, ch.w_lo.w};
      const uint32_t wh[4] = {ch.w_hi.x, ch.w_hi.y, ch.w_hi.z, ch.w_hi.w};
      const uint32_t sl[2] = {scale_bf16x2(ch.s_lo & 0xFF), scale_bf16x2(ch.s_lo >> 8)};
      const uint32_t sh[2] = {scale_bf16x2(ch.s_hi & 0xFF), scale_bf16x2(ch.s_hi >> 8)};
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        uint32_t p[4], q[4];
        dequant_word(wl[v], sl[v / 2], p);
        dequant_word(wh[v], sh[v / 2], q);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // A: rows g / g+8, K slots (2t, 2t+1) <- codes (8v+2h, 8v+2h+4), slots (2t+8, 2t+9) <- (8v+2h+1, 8v+2h+5)
          const uint32_t a[4] = {p[2 * h], q[2 * h], p[2 * h + 1], q[2 * h + 1]};
#pragma unroll
          for (int t = 0; t < N_TILES; ++t) {
            // x pairs in the same order: words (x0,x1) (x2,x3) (x4,x5) (x6,x7) -> (x_j, x_{j+4})
            const uint4 xw = ch.x[t][v];
            const uint32_t b0 = h == 0 ? prmt(xw.x, xw.z, 0x5410) : prmt(xw.y, xw.w, 0x5410);
            const uint32_t b1 = h == 0 ? prmt(xw.x, xw.z, 0x7632) : prmt(xw.y, xw.w, 0x7632);
            mma_bf16(acc[t], a, b0, b1);
          }
        }
      }
    }
  }

#pragma unroll
  for (int t = 0; t < N_TILES; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][t][i][lane] = acc[t][i];
  __syncthreads();
  for (int idx = threadIdx.x; idx < N_TILES * 4 * 32; idx += WARPS * 32) {
    const int t = idx / 128, i = (idx / 32) % 4, l = idx % 32;
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < WARPS; ++wi) sum += red[wi][t][i][l];
    // C fragment: c0, c1 -> (row g, tokens 2t, 2t+1); c2, c3 -> (row g + 8, same tokens)
    const int row = row0 + (l >> 2) + (i >= 2 ? 8 : 0);
    const int m = 8 * t + 2 * (l & 3) + (i & 1);
    if (row < N && m < M) out[m * stride_om + row] = __float2bfloat16_rn(sum * g[row] * 256.f);
  }
}

}  // namespace adallm

// Host side: plain pointers, so the file builds without torch headers too (see adallm_core/ops/cuda/__init__.py).
template <int N_TILES, int WARPS, int DEPTH>
static void launch(const void* x, const void* w, const void* s, const float* g, void* out, int M, int N, int K,
                   long stride_xm, long stride_om, cudaStream_t stream) {
  adallm::nvfp4_gemv_kernel<N_TILES, WARPS, DEPTH><<<(N + 15) / 16, WARPS * 32, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(x), static_cast<const uint32_t*>(w), static_cast<const uint8_t*>(s), g,
      static_cast<__nv_bfloat16*>(out), M, N, K, stride_xm, stride_om);
}

// variant: 0 = the default; 1..4 = (warps, depth) of (8, 2), (16, 2), (4, 2), (8, 3), for benchmarks.kernels sweeps
extern "C" int adallm_nvfp4_gemv(const void* x, const void* w, const void* s, const float* g, void* out, int M,
                                 int N, int K, long stride_xm, long stride_om, int variant, cudaStream_t stream) {
  if (M < 1 || M > 16 || K % adallm::kChunkK || N < 1 || variant < 0 || variant > 4) return 1;
  const bool two = M > 8;
  switch (variant) {
    case 0:
    case 1: two ? launch<2, 8, 2>(x, w, s, g, out, M, N, K, stride_xm, stride_om, stream)
                : launch<1, 8, 2>(x, w, s, g, out, M, N, K, stride_xm, stride_om, stream); break;
    case 2: two ? launch<2, 16, 2>(x, w, s, g, out, M, N, K, stride_xm, stride_om, stream)
                : launch<1, 16, 2>(x, w, s, g, out, M, N, K, stride_xm, stride_om, stream); break;
    case 3: two ? launch<2, 4, 2>(x, w, s, g, out, M, N, K, stride_xm, stride_om, stream)
                : launch<1, 4, 2>(x, w, s, g, out, M, N, K, stride_xm, stride_om, stream); break;
    case 4: two ? launch<2, 8, 3>(x, w, s, g, out, M, N, K, stride_xm, stride_om, stream)
                : launch<1, 8, 3>(x, w, s, g, out, M, N, K, stride_xm, stride_om, stream); break;
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 2;
}
