// samkv's own CUDA kernels: attention without a score matrix (flash style, tensor cores),
// Q/K/V split with RoPE in one pass, and SiLU(gate) * up. Compiled to PTX by build.rs when
// the `cuda` feature is on; loaded through candle's custom-kernel hook (src/model/cuda.rs).
//
// Attention follows FlashAttention-2: a block of 64 query rows streams the keys in tiles of
// 64, keeps a running max and sum per row, and never writes scores to memory. Grouped-query
// heads are packed into the rows (row = query * group + head in group), so one K/V tile serves
// every query head of its KV head. Causality is by position: query i sees the first vis[i]
// keys (keys are sorted by position, so the visible ones are a prefix). Long key ranges over
// few query rows (decode) are split across blocks and merged by flash_combine.
//
// Register layouts are those of PTX's mma.m16n8k16 (row.col, f32 accumulate): with
// g = lane / 4 and t = lane % 4, A holds rows g and g + 8 at columns 2t, 2t + 1 (+ 8);
// B holds rows 2t, 2t + 1 (+ 8) at column g; C holds rows g and g + 8 at columns 2t, 2t + 1.
// The score accumulators are therefore directly the A operand of P @ V.

#pragma once
#include "common.cuh"


#define BQ 64   // packed query rows per block: 4 warps x 16 (measured faster than 8 x 16, and
                // than 4 x 32 with Q in shared memory: docs/PERFORMANCE.md)
#define BK 64   // keys per tile
#define PAD 8   // shared-memory row padding (elements): no bank conflicts, 16-byte rows


template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0,
                                                        uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], uint32_t b0,
                                                 uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices from shared memory, transposed: lanes 8i..8i+7 give the rows of
// matrix i; each lane receives, of matrix i, rows 2t and 2t + 1 at column g.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *smem) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Four 8x8 b16 matrices from shared memory: lanes 8i..8i+7 give the rows of matrix i; each
// lane receives, of matrix i, row g at columns 2t and 2t + 1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *smem) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 16 bytes global -> shared without passing through registers; src_bytes 0 writes zeros.
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int src_bytes) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// ---- Hopper (sm_90a) only: warpgroup MMA. Instantiated by flash_sm90.cu alone; the PTX of
// kernels.cu never contains a wgmma.
//
// The WG variant of flash_attn keeps the register layouts above: for m64nNk16 each warp of the
// warpgroup owns 16 of the 64 rows, its A fragment (Q, or P) is mma.m16n8k16's A, and its
// accumulators are mma's C repeated over the N / 8 column tiles. Only the B operand (K or V)
// differs: the tensor core reads it from shared memory itself, described by a descriptor.
//
// K and V tiles arrive by the tensor memory accelerator (TMA): one thread asks for a whole
// tile, in boxes of BK rows x 64 columns (128 bytes a row) laid out with the 128-byte swizzle
// (16-byte chunk c of row r stored at chunk c ^ (r % 8)), the layout wgmma reads without bank
// conflicts. Thread-issued copies (cp.async, 16 bytes each) were tried first: their address
// registers held back every wgmma, and the kernel ran at 0.6x its mma.sync form.
// For K (B of S = Q K^T, K-major: N = keys, K = d) a descriptor's stride byte offset steps to
// the next 8 keys (1024 bytes); a k-step of 16 columns is 32 bytes further within a box. V (B
// of O = P V: K = keys, N = d) is read MN-major (transposed): the stride offset again steps 8
// keys, the leading offset to the next 64 columns (the next box).

// A CUtensorMap (opaque, built on the host by cuTensorMapEncodeTiled), passed by value.
struct alignas(64) TmaMap {
    unsigned long long v[16];
};

// Shared-memory matrix descriptor with the 128-byte swizzle (bits 62-63 = 1): start address,
// leading and stride byte offsets (all >> 4), base offset 0 (boxes are 1024-byte aligned).
__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ uint64_t wg_desc(const void *smem, uint32_t lead, uint32_t stride) {
    return (uint64_t)((smem_addr(smem) & 0x3FFFF) >> 4) | (uint64_t)((lead & 0x3FFFF) >> 4) << 16 |
           (uint64_t)((stride & 0x3FFFF) >> 4) << 32 | 1ull << 62;
}
// A transaction barrier that completes once `bytes` have landed (one arrival: the issuer's).
__device__ __forceinline__ void mbar_init(uint64_t *bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(bar)));
}
__device__ __forceinline__ void mbar_expect(uint64_t *bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t *bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred P1;\nLAB_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}
// Box (c0, c1, c2) of a 3-D tensor map into shared memory; completes on `bar`.
__device__ __forceinline__ void tma_load(void *dst, const TmaMap *map, uint64_t *bar, int c0,
                                         int c1, int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_wait_all() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Pins an accumulator between wgmma issue and wait: the compiler may not move its reads or
// writes across this point (wgmma's writes are invisible to it).
__device__ __forceinline__ void wg_pin(float &x) { asm volatile("" : "+f"(x)::"memory"); }

// D (64 x N, f32) (+)= A (64 x 16, registers) * B (16 x N, shared memory via descriptor b);
// TB = 1 reads B MN-major (transposed). scale_d = 0 ignores D's old value. The T* argument
// only picks the element type. Inline PTX numbers operands in order: the NA = N / 2
// accumulators are %0 .. %(NA - 1), then come a (4), b, scale_d (SC) and TB.
#define WG_D32                                                                                     \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                       \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WG_D64 WG_D32 ", "                                                                         \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "             \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WG_OUT32                                                                                   \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),\
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),\
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),\
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define WG_OUT64 WG_OUT32,                                                                         \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),\
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),\
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),\
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define WGMMA_RS(N, NA, SC, TAIL, TY, T)                                                           \
    template <int TB>                                                                              \
    __device__ __forceinline__ void wgmma_n##N(float d[NA], const uint32_t a[4], uint64_t b,       \
                                               int scale_d, T *) {                                 \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SC ", 0;\n"                               \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" WG_D##NA     \
                     "}, " TAIL ";\n}\n"                                                           \
                     : WG_OUT##NA                                                                  \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d),           \
                       "n"(TB));                                                                   \
    }
#define WG_TAIL32 "{%32, %33, %34, %35}, %36, p, 1, 1, %38"
#define WG_TAIL64 "{%64, %65, %66, %67}, %68, p, 1, 1, %70"
WGMMA_RS(64, 32, "%37", WG_TAIL32, "bf16", __nv_bfloat16)
WGMMA_RS(64, 32, "%37", WG_TAIL32, "f16", __half)
WGMMA_RS(128, 64, "%69", WG_TAIL64, "bf16", __nv_bfloat16)
WGMMA_RS(128, 64, "%69", WG_TAIL64, "f16", __half)

// Rows [kt, kt + BK) of one head's (T, D) keys or values into a shared tile; rows at or past
// kend become zeros. A warp copies whole rows (full 128-byte lines from L2: a warp spread over
// 8 rows doubled the L2 traffic); the loop is unrolled at compile time (its address arithmetic
// was half of the loop's instructions). `at(r, c)` is where element (r, c) goes.
template <typename T, int D, typename At>
__device__ __forceinline__ void load_rows(const T *head, int kt, int kend, At at) {
    constexpr int PER_ROW = D / 8, ROWS = 128 / PER_ROW;  // 16-byte chunks; rows per pass
    const int r0 = threadIdx.x / PER_ROW, c = (threadIdx.x % PER_ROW) * 8;
    const T *first = head + (long long)kt * D;  // a row past kend reads nothing (size 0) here
    const T *src = first + r0 * D + c;
#pragma unroll
    for (int i = 0; i < BK / ROWS; i++) {
        const int r = r0 + i * ROWS;
        const bool in = kt + r < kend;
        cp_async16(at(r, c), in ? src + i * ROWS * D : first, in ? 16 : 0);
    }
}

template <typename T, int D>
__device__ __forceinline__ void load_tile(T (*tile)[D + PAD], const T *head, int kt, int kend) {
    load_rows<T, D>(head, kt, kend, [&](int r, int c) { return &tile[r][c]; });
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// q: (heads, tq, D) with head stride q_hs; k, v: (kv_heads, tk, D) with head strides k_hs,
// v_hs (rows are D apart). vis: tq counts, or null when every query sees all tk keys.
// Without `part`, writes out (tq, heads * D) normalized; with it, writes this split's
// normalized rows and their (max, sum) for flash_combine:
// part[((split * kv_heads + kvh) * rows + r) * (D + 2) + ...].
//
// Batched decode (`seqs` not null): query i is sequence i's new token and has its own cache;
// seqs[5 i ..] = its keys' and values' addresses, their head strides and its visible count.
// Block x is then sequence x (its `group` rows).
//
// WG: Hopper's wgmma instead of mma.sync (flash_sm90.cu); the warpgroup computes even rows
// past the block's end (zeros: its four warps must issue every wgmma together).
template <typename T, int D, bool WG>
__device__ void flash_attn(const T *__restrict__ q, const T *k, const T *v, T *__restrict__ out,
                           float *__restrict__ part, const uint32_t *__restrict__ vis,
                           const long long *__restrict__ seqs, int tq, int tk, int group,
                           int heads, long long q_hs, long long k_hs, long long v_hs,
                           float scale_log2, int split_len, const TmaMap *kmap = nullptr,
                           const TmaMap *vmap = nullptr) {
    // Two stages of one K and one V tile each (dynamic: 68 KiB for D = 128; WG: 64 KiB from
    // the first 1024-byte boundary, which the swizzle needs, and 1 KiB to find it).
    extern __shared__ __align__(128) unsigned char smem[];
    typedef T Tile[BK][D + PAD];
    Tile *tiles = reinterpret_cast<Tile *>(smem);  // [stage * 2] = K, [stage * 2 + 1] = V
    T *wg_tiles = reinterpret_cast<T *>(smem + ((1024 - (smem_addr(smem) & 1023)) & 1023));
    __shared__ __align__(8) uint64_t tma_bar[2];  // WG: one per stage
    __shared__ int cta_vis, cta_min_vis;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int kvh = blockIdx.y;
    const int rows = tq * group;
    const bool batch = seqs != nullptr;
    // Later query blocks have more keys to visit: start them first.
    const int qblock = batch ? blockIdx.x : gridDim.x - 1 - blockIdx.x;
    const int row_lo = batch ? qblock * group : qblock * BQ;
    const int row_hi = batch ? row_lo + group : rows;  // this block's rows: [row_lo, row_hi)
    const int row0 = row_lo + warp * 16;
    if constexpr (!WG) {  // WG reads k and v through its maps; batched decode is never WG
        if (batch) {
            const long long *e = seqs + 5 * qblock;
            k = reinterpret_cast<const T *>(e[0]);
            v = reinterpret_cast<const T *>(e[1]);
            k_hs = e[2];
            v_hs = e[3];
            tk = (int)e[4];
        }
    }

    if (threadIdx.x == 0) {
        cta_vis = 0, cta_min_vis = INT_MAX;
        if constexpr (WG) {
            mbar_init(&tma_bar[0]);
            mbar_init(&tma_bar[1]);
            asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        }
    }
    __syncthreads();
    if (threadIdx.x < BQ) {
        int r = row_lo + threadIdx.x;
        if (r < row_hi) {
            int n = vis ? (int)vis[r / group] : tk;
            atomicMax(&cta_vis, n);
            atomicMin(&cta_min_vis, n);
        }
    }
    __syncthreads();
    const int kbeg = blockIdx.z * split_len;
    const int kend = min(min(tk, kbeg + split_len), cta_vis);
    // Tiles wholly below this are visible to every row: no mask needed.
    const int full_to = min(kend, cta_min_vis);

    // This thread's two rows (g and g + 8 of the warp's 16).
    int rr[2] = {row0 + g, row0 + g + 8};
    int rvis[2];
    const T *qrow[2];
    for (int i = 0; i < 2; i++) {
        bool ok = rr[i] < row_hi;
        int qi = ok ? rr[i] / group : 0;
        int head = kvh * group + (ok ? rr[i] % group : 0);
        rvis[i] = ok ? (vis ? (int)vis[qi] : tk) : 0;
        qrow[i] = q + head * q_hs + (long long)qi * D;
    }
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        int c = kk * 16 + 2 * t;
        qa[kk][0] = rr[0] < row_hi ? *reinterpret_cast<const uint32_t *>(qrow[0] + c) : 0;
        qa[kk][1] = rr[1] < row_hi ? *reinterpret_cast<const uint32_t *>(qrow[1] + c) : 0;
        qa[kk][2] = rr[0] < row_hi ? *reinterpret_cast<const uint32_t *>(qrow[0] + c + 8) : 0;
        qa[kk][3] = rr[1] < row_hi ? *reinterpret_cast<const uint32_t *>(qrow[1] + c + 8) : 0;
    }

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    const bool active = WG || row0 < row_hi;
    // Stage st's K and V tiles for keys [kt, kt + BK): WG by TMA (rows past the tensor's end
    // arrive as zeros; rows past kend are masked below), else by every thread's cp.async.
    auto load = [&](int st, int kt) {
        if constexpr (WG) {
            if (threadIdx.x != 0) return;
            T *kw = wg_tiles + 2 * st * BK * D, *vw = kw + BK * D;
            mbar_expect(&tma_bar[st], 2 * BK * D * sizeof(T));
#pragma unroll
            for (int h = 0; h < D / 64; h++) {
                tma_load(kw + h * BK * 64, kmap, &tma_bar[st], h * 64, kt, kvh);
                tma_load(vw + h * BK * 64, vmap, &tma_bar[st], h * 64, kt, kvh);
            }
        } else {
            load_tile<T, D>(tiles[2 * st], k + kvh * k_hs, kt, kend);
            load_tile<T, D>(tiles[2 * st + 1], v + kvh * v_hs, kt, kend);
            cp_async_commit();
        }
    };

    // Double-buffered: the next tile's K and V load while this one is computed. The next load
    // is issued after the wait and the barrier, which also tells that every warp is done with
    // the stage it refills.
    const int ntiles = kend > kbeg ? (kend - kbeg + BK - 1) / BK : 0;
    if (ntiles > 0) load(0, kbeg);
    for (int it = 0; it < ntiles; it++) {
        const int kt = kbeg + it * BK, st = it & 1;
        if constexpr (WG)
            mbar_wait(&tma_bar[st], (it >> 1) & 1);  // stage st's (it / 2)-th fill
        else
            cp_async_wait_all();  // this tile is in, for this thread...
        __syncthreads();          // ...and for every thread
        if (it + 1 < ntiles) load(st ^ 1, kt + BK);
        T(*ks)[D + PAD] = tiles[2 * st];
        T(*vs)[D + PAD] = tiles[2 * st + 1];
        // S = Q K^T for 16 rows x BK keys.
        float s[BK / 8][4];
        if constexpr (WG) {
            const T *kw = wg_tiles + 2 * st * BK * D;
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++)  // 16 columns: 32 bytes into box kk / 4
                wgmma_n64<0>(&s[0][0], qa[kk],
                             wg_desc(kw + (kk / 4) * BK * 64 + (kk % 4) * 16, 16, 1024), kk > 0,
                             (T *)nullptr);
            wg_commit();
            wg_wait_all();
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) wg_pin(s[nt][e]);
        }
        if (active) {
            if constexpr (!WG) {
#pragma unroll
                for (int nt = 0; nt < BK / 8; nt++)
                    s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
                const int mat = lane >> 3, mrow = lane & 7;
#pragma unroll
                for (int nt = 0; nt < BK / 8; nt += 2) {
#pragma unroll
                    for (int kk = 0; kk < D / 16; kk++) {
                        uint32_t b[4];
                        ldmatrix_x4(b, &ks[(nt + (mat >> 1)) * 8 + mrow][kk * 16 + (mat & 1) * 8]);
                        mma16816<T>(s[nt], qa[kk], b[0], b[1]);
                        mma16816<T>(s[nt + 1], qa[kk], b[2], b[3]);
                    }
                }
            }
            // Mask what a row may not see (only tiles some row of the block ends in), then
            // the running max in log2 units. Reductions run as independent chains: a single
            // chain of dependent max/add per row stalled the warps.
            if (kt + BK > full_to) {
#pragma unroll
                for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int key = kt + nt * 8 + 2 * t + (e & 1);
                        if (!(key < rvis[e >> 1] && key < kend)) s[nt][e] = -INFINITY;
                    }
                }
            }
            float mb[2], alpha[2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                float c[4];
#pragma unroll
                for (int j = 0; j < 4; j++)
                    c[j] = fmaxf(fmaxf(s[j][2 * i], s[j][2 * i + 1]),
                                 fmaxf(s[j + 4][2 * i], s[j + 4][2 * i + 1]));
                float mx = quad_max(fmaxf(fmaxf(c[0], c[1]), fmaxf(c[2], c[3])));
                float mnew = fmaxf(m[i], mx * scale_log2);
                // A row that has seen nothing yet keeps -inf; exp2 of -inf - 0 is 0.
                mb[i] = mnew == -INFINITY ? 0.f : mnew;
                alpha[i] = exp2f(m[i] - mb[i]);
                m[i] = mnew;
            }
            float ls[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int hi = e >> 1;
                    float p = exp2f(fmaf(s[nt][e], scale_log2, -mb[hi]));
                    s[nt][e] = p;
                    ls[hi][(nt & 1) * 2 + (e & 1)] += p;
                }
            }
#pragma unroll
            for (int i = 0; i < 2; i++)
                l[i] = l[i] * alpha[i] + ((ls[i][0] + ls[i][1]) + (ls[i][2] + ls[i][3]));
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                o[dt][0] *= alpha[0];
                o[dt][1] *= alpha[0];
                o[dt][2] *= alpha[1];
                o[dt][3] *= alpha[1];
            }
        }

        // O += P V: the score accumulators of key tiles 2j, 2j + 1 form P's A operand.
        if constexpr (WG) {
            const T *vw = wg_tiles + (2 * st + 1) * BK * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++)
#pragma unroll
                for (int e = 0; e < 4; e++) wg_pin(o[dt][e]);
            // P is packed before the fence: registers written between wgmmas make the
            // compiler wait for the earlier ones.
            uint32_t pa[BK / 16][4];
#pragma unroll
            for (int j = 0; j < BK / 16; j++) {
                pa[j][0] = pack2<T>(s[2 * j][0], s[2 * j][1]);
                pa[j][1] = pack2<T>(s[2 * j][2], s[2 * j][3]);
                pa[j][2] = pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]);
                pa[j][3] = pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3]);
            }
            wg_fence();
#pragma unroll
            for (int j = 0; j < BK / 16; j++) {
                // 16 keys: 2048 bytes into each box; the next 64 columns a box further
                const uint64_t b = wg_desc(vw + j * 16 * 64, BK * 64 * sizeof(T), 1024);
                if constexpr (D == 128)
                    wgmma_n128<1>(&o[0][0], pa[j], b, 1, (T *)nullptr);
                else
                    wgmma_n64<1>(&o[0][0], pa[j], b, 1, (T *)nullptr);
            }
            wg_commit();
            wg_wait_all();
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++)
#pragma unroll
                for (int e = 0; e < 4; e++) wg_pin(o[dt][e]);
        } else if (active) {
#pragma unroll
            for (int j = 0; j < BK / 16; j++) {
                uint32_t pa[4] = {pack2<T>(s[2 * j][0], s[2 * j][1]),
                                  pack2<T>(s[2 * j][2], s[2 * j][3]),
                                  pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]),
                                  pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3])};
                const int mat = lane >> 3, mrow = lane & 7;
#pragma unroll
                for (int dt = 0; dt < D / 8; dt += 2) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, &vs[j * 16 + (mat & 1) * 8 + mrow][dt * 8 + (mat >> 1) * 8]);
                    mma16816<T>(o[dt], pa, b[0], b[1]);
                    mma16816<T>(o[dt + 1], pa, b[2], b[3]);
                }
            }
        }
    }
    if constexpr (!WG) cp_async_wait_all();
    if (!active) return;

#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] = quad_sum(l[i]);
        if (rr[i] >= row_hi) continue;
        float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        int qi = rr[i] / group, head = kvh * group + rr[i] % group;
        if (part == nullptr) {
            T *dst = out + (long long)qi * heads * D + head * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                *reinterpret_cast<uint32_t *>(dst + dt * 8 + 2 * t) =
                    pack2<T>(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
            }
        } else {
            float *dst =
                part + (((long long)blockIdx.z * gridDim.y + kvh) * rows + rr[i]) * (D + 2);
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                dst[dt * 8 + 2 * t] = o[dt][2 * i] * inv;
                dst[dt * 8 + 2 * t + 1] = o[dt][2 * i + 1] * inv;
            }
            if (t == 0) {
                dst[D] = m[i];
                dst[D + 1] = l[i];
            }
        }
    }
}

// Merges the splits of flash_attn: grid (rows, kv_heads), D threads.
template <typename T, int D>
__device__ void flash_combine(const float *__restrict__ part, T *__restrict__ out, int nsplit,
                              int rows, int group, int heads) {
    const int r = blockIdx.x, kvh = blockIdx.y, d = threadIdx.x;
    const int kvheads = gridDim.y;
    float mmax = -INFINITY;
    for (int s = 0; s < nsplit; s++)
        mmax = fmaxf(mmax, part[(((long long)s * kvheads + kvh) * rows + r) * (D + 2) + D]);
    float acc = 0.f, wsum = 0.f;
    if (mmax != -INFINITY) {
        for (int s = 0; s < nsplit; s++) {
            const float *p = part + (((long long)s * kvheads + kvh) * rows + r) * (D + 2);
            float w = p[D + 1] * exp2f(p[D] - mmax);
            acc += w * p[d];
            wsum += w;
        }
    }
    int qi = r / group, head = kvh * group + r % group;
    out[(long long)qi * heads * D + head * D + d] = from_f<T>(wsum > 0.f ? acc / wsum : 0.f);
}

// __launch_bounds__(128, 3): registers capped (168) for three blocks per SM, measured faster on
// the H200 than two (1.32 vs 1.60 ms per layer at 5184 tokens); nothing spills since the
// softmax reductions were split into independent chains.
#define FLASH(NAME, T, D)                                                                      \
    extern "C" __global__ void __launch_bounds__(128, 3)                                          \
        flash_attn_##NAME##_d##D(const T *q, const T *k, const T *v, T *out, float *part,      \
                                 const uint32_t *vis, const long long *seqs, int tq, int tk,   \
                                 int group, int heads, long long q_hs, long long k_hs,         \
                                 long long v_hs, float scale_log2, int split_len) {            \
        flash_attn<T, D, false>(q, k, v, out, part, vis, seqs, tq, tk, group, heads, q_hs,     \
                                k_hs, v_hs, scale_log2, split_len);                            \
    }                                                                                          \
    extern "C" __global__ void flash_combine_##NAME##_d##D(const float *part, T *out,          \
                                                           int nsplit, int rows, int group,    \
                                                           int heads) {                        \
        flash_combine<T, D>(part, out, nsplit, rows, group, heads);                            \
    }

// The same on Hopper's wgmma (flash_sm90.cu), with the tensor maps of k and v: 65 KiB of
// shared memory, three blocks per SM.
#define FLASH_WG(NAME, T, D)                                                                   \
    extern "C" __global__ void __launch_bounds__(128, 3) flash_attn_wg_##NAME##_d##D(          \
        const T *q, const T *k, const T *v, T *out, float *part, const uint32_t *vis,          \
        const long long *seqs, int tq, int tk, int group, int heads, long long q_hs,           \
        long long k_hs, long long v_hs, float scale_log2, int split_len,                       \
        const __grid_constant__ TmaMap kmap, const __grid_constant__ TmaMap vmap) {            \
        flash_attn<T, D, true>(q, k, v, out, part, vis, seqs, tq, tk, group, heads, q_hs,      \
                               k_hs, v_hs, scale_log2, split_len, &kmap, &vmap);               \
    }
