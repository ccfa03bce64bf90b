// NVFP4 linear for decode (M <= 8 tokens): y[M, N] = x[M, K] @ W.T, W tile-major in the kernels' word order
// (adallm_core/nvfp4.py: to_kernel_order, a word holds 8 consecutive codes of a row, pair p = elements 2p, 2p + 1;
// to_tile_major, each band of 16 rows stored in 128-K chunks: 16 rows x 16 words, then their 16 x 8 scale bytes).
//
// Memory bound with a short tail. A block owns ROWS x 16 output rows and all of K; its warps split K in 128-wide
// chunks (warp w takes chunks w, w + WARPS, ...), and each warp streams its chunks through a private ring of DEPTH
// shared-memory stages filled by cp.async, so its loads are in flight without holding registers. Tile-major, one copy
// of a warp reads 512 contiguous bytes (8 rows of a chunk), not 8 rows x 64 B a row apart: 8-13% faster
// (benchmarks/NOTES.md). A lane copies, and later reads back, its own 16 B of rows g and g + 8 of each row tile
// (g = lane / 4: 32 codes at K = chunk + 32 t, t = lane % 4) and its own 64 B of x (token g); only the rows' 8 scale
// bytes a chunk are shared in the warp. The cross-warp sum goes through shared memory once at the end: no split-K
// partials in global memory, which is where the Triton decode kernel's fixed cost a launch went.
//
// MMA: mma.sync m16n8k16 with W as A (rows g, g + 8) and x as B (tokens g). The MMA's K order is free as long as
// A and B agree: lane t's K slots (2t, 2t + 1) and (2t + 8, 2t + 9) take elements (0, 1) and (2, 3) of a word, the
// next MMA elements (4, 5) and (6, 7), so B is x's own consecutive pairs: no shuffles.
//
// Exactness (see ops/triton/nvfp4_gemm.py): pair p's magnitude and sign bits moved to bits 6..8 and 15 of each
// half ARE the BF16 patterns of v * 2^-126; one fma.rn.bf16x2 by (scale * 2^118) gives v * scale * 2^-8 exactly;
// fp32 accumulation; the epilogue multiplies by global_scale * 2^8. sm_80+ (built for sm_89 Ada and sm_90 Hopper).
//
// act (1 SiLU, 2 GELU-tanh): W is a fused gate|up [N = 2I, K], out [M, I] = act(x @ gate.T) * (x @ up.T). A block's
// even row tiles are gate rows and each odd one the up rows of the tile before it, so the epilogue has both; each
// is rounded to BF16 first, as the linear's own output would be (the activation op's input), then act(gate) * up
// in fp32, rounded once.
//
// Launched with programmatic dependent launch on sm_90+ (adallm_core/ops/pdl.py), a block fills its ring's first
// weight stages before it waits for the kernel that writes x. A grid of at most one block an SM then asks for more
// than half an SM's shared memory: its blocks are placed while the kernel before it still runs, and without that
// they pile two or three onto the SMs that free first (fused gate|up then down at one token: down on ~108 SMs, its
// slowest block 16 us instead of 10.8; benchmarks/NOTES.md).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cstdint>

namespace adallm {

constexpr int kChunkK = 128;
constexpr int kWBytes = 16 * kChunkK / 2;   // 16 rows of packed codes
constexpr int kSBytes = 16 * kChunkK / 16;  // their scale bytes
constexpr int kXBytesPerToken = kChunkK * 2;  // x: M tokens of a chunk, bf16

__host__ __device__ constexpr int stage_bytes(int m, int rows) {
  return rows * (kWBytes + kSBytes) + m * kXBytesPerToken;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}

__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(dst)), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Programmatic dependent launch (sm_90+; adallm_core/ops/pdl.py): wait for the kernel before this one to complete
// and its writes to be visible, then let the next one's blocks start. Without a PDL launch the wait returns at once;
// on Ada (no PDL) both compile to nothing.
__device__ __forceinline__ void wait_for_prior_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// p[i] = bf16x2 of elements (2i, 2i + 1) of word w, times the scale pair s2 (see the header)
__device__ __forceinline__ void dequant_word(uint32_t w, uint32_t s2, uint32_t (&p)[4]) {
  asm("{\n"
      ".reg .b32 t, u, z;\n"
      "mov.b32 z, 0x80008000;\n"
      "and.b32 %0, %4, 0x81C081C0;\n"
      "shf.l.wrap.b32 t, %4, %4, 4;  and.b32 %1, t, 0x81C081C0;\n"
      "shf.l.wrap.b32 t, %4, %4, 10; and.b32 %2, t, 0x81C081C0;\n"
      "shf.l.wrap.b32 t, %4, %4, 6;  and.b32 t, t, 0x00400040;\n"
      "shf.l.wrap.b32 u, %4, %4, 14; and.b32 u, u, 0x81808180; or.b32 %3, t, u;\n"
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
  const uint32_t bits = static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v)));
  return bits | (bits << 16);
}

__device__ __forceinline__ float bf16_round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// act(gate) * up in fp32, as the Triton activation op (ops/triton/activation.py act_mul)
__device__ __forceinline__ float act_mul(float g, float u, int act) {
  float a;
  if (act == 2) {  // tanh approximation, as gelu_pytorch_tanh
    const float z = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    a = 0.5f * g * (1.f + (2.f / (1.f + __expf(-2.f * z)) - 1.f));
  } else {
    a = g / (1.f + __expf(-g));
  }
  return a * u;
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Before Hopper, ptxas given no minimum of blocks an SM held the default variant to 64 registers and spilled 8
// bytes a thread (nvcc 13.0, sm_89); a minimum of one lets it take the 80 it needs. Shared memory, not registers,
// bounds these blocks there (two an SM at most). sm_90 keeps the bound it was measured with.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define ADALLM_GEMV_BOUNDS(threads) __launch_bounds__(threads, 1)
#else
#define ADALLM_GEMV_BOUNDS(threads) __launch_bounds__(threads)
#endif

template <int ROWS, int WARPS, int DEPTH>
__global__ void ADALLM_GEMV_BOUNDS(WARPS * 32) nvfp4_gemv_kernel(
    const __nv_bfloat16* __restrict__ x, const uint32_t* __restrict__ w, const uint8_t* __restrict__ s,
    const float* __restrict__ g, __nv_bfloat16* __restrict__ out, int M, int N, int K, long stride_xm,
    long stride_om, int act) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int grp = lane >> 2, tig = lane & 3;
  const int row0 = blockIdx.x * 16 * ROWS;
  const int stage = stage_bytes(M, ROWS);
  uint8_t* ring = smem + warp * DEPTH * stage;
  constexpr int kS = ROWS * kWBytes, kX = ROWS * (kWBytes + kSBytes);

  // row tiles past N (N is a multiple of 16) are computed from the last one and dropped
  const int chunks = K / kChunkK;
  const int last_tile = N / 16 - 1;
  const int gate_tiles = N / 32;  // act: tile r of the block is gate tile row0 / 32 + r / 2, or its up tile
  const uint32_t* w_tile[ROWS];  // a chunk of a row tile: 16 rows x 16 words; this lane's 4 words of row g
  const uint8_t* s_tile[ROWS];   // and its 16 rows x 8 scale bytes
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const long tile = act ? (r & 1) * gate_tiles + min(row0 / 32 + r / 2, gate_tiles - 1)
                          : min(row0 / 16 + r, last_tile);
    w_tile[r] = w + tile * chunks * 256 + grp * 16 + tig * 4;
    s_tile[r] = s + tile * chunks * 128;
  }
  const bool x_ok = grp < M;  // lane's token
  const __nv_bfloat16* x_lane = x + static_cast<long>(x_ok ? grp : 0) * stride_xm + tig * 32;
  const int x_slot = kX + lane * 64;

  const int mine = chunks > warp ? (chunks - warp + WARPS - 1) / WARPS : 0;

  auto issue_weights = [&](int i) {
    uint8_t* st = ring + (i % DEPTH) * stage;
    const int c = warp + i * WARPS;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) cp_async16(st + (2 * r + h) * 512 + lane * 16, w_tile[r] + c * 256 + h * 128);
      // the tile's 128 scale bytes of this chunk, 8 a lane from lanes 0..15
      if (lane < 16) cp_async8(st + kS + r * 128 + lane * 8, s_tile[r] + c * 128 + lane * 8);
    }
  };
  auto issue_x = [&](int i) {
    uint8_t* st = ring + (i % DEPTH) * stage;
    const int k = (warp + i * WARPS) * kChunkK;
    if (x_ok)
#pragma unroll
      for (int v = 0; v < 4; ++v) cp_async16(st + x_slot + v * 16, x_lane + k + v * 8);
  };

  // The ring's first weights are constants: they stream while a PDL launch still waits for the kernel that writes x.
  // They join chunk 0's group, so the loop's wait for chunk 0 also covers them.
#pragma unroll
  for (int d = 0; d < DEPTH; ++d)
    if (d < mine) issue_weights(d);
  wait_for_prior_kernel();
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) {
    if (d < mine) issue_x(d);
    cp_async_commit();  // one group per chunk, empty or not, so wait_group counts chunks
  }

  float acc[ROWS][4] = {};
  for (int i = 0; i < mine; ++i) {
    cp_async_wait<DEPTH - 1>();
    __syncwarp();  // the scale bytes came from other lanes' copies
    const uint8_t* st = ring + (i % DEPTH) * stage;
    uint4 wv[ROWS][2];
    uint32_t sv[ROWS][2];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wv[r][h] = *reinterpret_cast<const uint4*>(st + (2 * r + h) * 512 + lane * 16);
        sv[r][h] = *reinterpret_cast<const uint16_t*>(st + kS + (16 * r + 8 * h + grp) * 8 + tig * 2);
      }
    uint4 xv[4];
#pragma unroll
    for (int v = 0; v < 4; ++v)
      xv[v] = x_ok ? *reinterpret_cast<const uint4*>(st + x_slot + v * 16) : make_uint4(0, 0, 0, 0);
    __syncwarp();  // the stage is read: refill it
    if (i + DEPTH < mine) {
      issue_weights(i + DEPTH);
      issue_x(i + DEPTH);
    }
    cp_async_commit();

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const uint32_t lo[4] = {wv[r][0].x, wv[r][0].y, wv[r][0].z, wv[r][0].w};
      const uint32_t hi[4] = {wv[r][1].x, wv[r][1].y, wv[r][1].z, wv[r][1].w};
      const uint32_t slo[2] = {scale_bf16x2(sv[r][0] & 0xFF), scale_bf16x2(sv[r][0] >> 8)};
      const uint32_t shi[2] = {scale_bf16x2(sv[r][1] & 0xFF), scale_bf16x2(sv[r][1] >> 8)};
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        uint32_t p[4], q[4];
        dequant_word(lo[v], slo[v / 2], p);
        dequant_word(hi[v], shi[v / 2], q);
        const uint32_t a0[4] = {p[0], q[0], p[1], q[1]}, a1[4] = {p[2], q[2], p[3], q[3]};
        mma_bf16(acc[r], a0, xv[v].x, xv[v].y);
        mma_bf16(acc[r], a1, xv[v].z, xv[v].w);
      }
    }
  }

  cp_async_wait<0>();
  __syncthreads();  // every ring is done: its space holds the cross-warp sum
  float* red = reinterpret_cast<float*>(smem);
  constexpr int kPerWarp = ROWS * 128;
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp * kPerWarp + (r * 4 + i) * 32 + lane] = acc[r][i];
  __syncthreads();
  if (act) {
    // tile r = 2p holds gate rows, r + 1 their up rows; output column = gate row
    for (int idx = threadIdx.x; idx < kPerWarp / 2; idx += WARPS * 32) {
      const int p = idx / 128, i = (idx / 32) % 4, l = idx % 32;
      float gate = 0.f, up = 0.f;
#pragma unroll
      for (int wi = 0; wi < WARPS; ++wi) {
        gate += red[wi * kPerWarp + 256 * p + idx % 128];
        up += red[wi * kPerWarp + 256 * p + 128 + idx % 128];
      }
      const int col = row0 / 2 + 16 * p + (l >> 2) + (i >= 2 ? 8 : 0);
      const int m = 2 * (l & 3) + (i & 1);
      if (col < N / 2 && m < M) {
        gate = bf16_round(gate * g[col] * 256.f);
        up = bf16_round(up * g[N / 2 + col] * 256.f);
        out[m * stride_om + col] = __float2bfloat16_rn(act_mul(gate, up, act));
      }
    }
    return;
  }
  for (int idx = threadIdx.x; idx < kPerWarp; idx += WARPS * 32) {
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < WARPS; ++wi) sum += red[wi * kPerWarp + idx];
    const int r = idx / 128, i = (idx / 32) % 4, l = idx % 32;
    // C fragment: c0, c1 -> (row g, tokens 2t, 2t + 1); c2, c3 -> (row g + 8, same tokens)
    const int row = row0 + 16 * r + (l >> 2) + (i >= 2 ? 8 : 0);
    const int m = 2 * (l & 3) + (i & 1);
    if (row < N && m < M) out[m * stride_om + row] = __float2bfloat16_rn(sum * g[row] * 256.f);
  }
}

}  // namespace adallm

// Host side: plain pointers, so the file builds without torch headers too (see adallm_core/ops/cuda_gemv.py).
constexpr int kMaxM = 8;  // one MMA token tile (a second one lost to the Triton kernel: benchmarks/NOTES.md)

// Set per device by adallm_nvfp4_gemv_init: the SM count, and the shared memory that leaves room for one block an SM
static int g_sms = 0, g_one_block_an_sm = 0;

template <int ROWS, int WARPS, int DEPTH>
struct Variant {
  static constexpr auto kernel = adallm::nvfp4_gemv_kernel<ROWS, WARPS, DEPTH>;
  static int smem(int M) { return WARPS * DEPTH * adallm::stage_bytes(M, ROWS); }
  static inline int allowed = 0;  // bytes of shared memory a block may take on this process's GPU
  static bool fits(int M) { return smem(M) <= allowed; }
  // Up front, not at launch: a CUDA-graph capture must not meet the first call. Per device: the current one
  static int allow_smem(int optin) {
    allowed = min(smem(kMaxM), optin);
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                max(allowed, g_one_block_an_sm)) != cudaSuccess;
  }
  static int launch(const void* x, const void* w, const void* s, const float* g, void* out, int M, int N, int K,
                    long stride_xm, long stride_om, int act, int pdl, cudaStream_t stream) {
    if (act && (ROWS % 2 || N % 32)) return 1;  // a block pairs gate and up tiles
    if (!fits(M)) return 3;  // e.g. 4 row tiles of 7-8 tokens on Ada (99 KB a block)
    cudaLaunchConfig_t config = {};
    const int blocks = (N + 16 * ROWS - 1) / (16 * ROWS);
    config.gridDim = dim3(blocks);
    config.blockDim = dim3(WARPS * 32);
    config.dynamicSmemBytes = pdl && blocks <= g_sms ? max(smem(M), g_one_block_an_sm) : smem(M);
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&config, kernel, static_cast<const __nv_bfloat16*>(x), static_cast<const uint32_t*>(w),
                              static_cast<const uint8_t*>(s), g, static_cast<__nv_bfloat16*>(out), M, N, K,
                              stride_xm, stride_om, act) == cudaSuccess ? 0 : 2;
  }
};

// variant 0 is the default (2 row tiles, 8 warps, 2 stages); 3 (4 row tiles) is what the op picks where two row
// tiles would leave some SMs with one block and others with two (ops/cuda_gemv.py pick_variant); 1 and 2 are swept
// beside them by benchmarks.kernels
#define ADALLM_VARIANTS(X) X(0, 2, 8, 2) X(1, 1, 8, 4) X(2, 2, 16, 2) X(3, 4, 8, 2)

extern "C" int adallm_nvfp4_gemv_init() {
  int device = 0, optin = 0, per_sm = 0, reserved = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 5;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device);
  cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, device);
  g_one_block_an_sm = min(optin, per_sm / 2 - reserved + 1024);  // two such blocks exceed the SM
  int rc = 0;
#define ADALLM_ALLOW(V, R, W, D) rc |= Variant<R, W, D>::allow_smem(optin);
  ADALLM_VARIANTS(ADALLM_ALLOW)
#undef ADALLM_ALLOW
  return rc ? 4 : 0;
}

// whether `variant` can launch M tokens on this GPU (shared memory a block): the op asks before it picks a variant
extern "C" int adallm_nvfp4_gemv_fits(int M, int variant) {
  switch (variant) {
#define ADALLM_FITS(V, R, W, D) \
  case V: return M >= 1 && M <= kMaxM && Variant<R, W, D>::fits(M);
    ADALLM_VARIANTS(ADALLM_FITS)
#undef ADALLM_FITS
  }
  return 0;
}

// act: 0 a plain linear, 1 / 2 a fused gate|up with SiLU / GELU-tanh (out [M, N / 2]; variants of even ROWS, N a
// multiple of 32). pdl: launch with programmatic dependent launch (sm_90+ only; adallm_core/ops/pdl.py decides)
extern "C" int adallm_nvfp4_gemv(const void* x, const void* w, const void* s, const float* g, void* out, int M,
                                 int N, int K, long stride_xm, long stride_om, int variant, int act, int pdl,
                                 cudaStream_t stream) {
  if (M < 1 || M > kMaxM || K % adallm::kChunkK || N < 1 || act < 0 || act > 2) return 1;
  int rc = 1;
  switch (variant) {
#define ADALLM_CASE(V, R, W, D) \
  case V: rc = Variant<R, W, D>::launch(x, w, s, g, out, M, N, K, stride_xm, stride_om, act, pdl, stream); break;
    ADALLM_VARIANTS(ADALLM_CASE)
#undef ADALLM_CASE
  }
  if (rc) return rc;
  return cudaGetLastError() == cudaSuccess ? 0 : 2;
}
