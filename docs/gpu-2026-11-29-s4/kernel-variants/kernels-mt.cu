// samkv's own CUDA kernels: attention without a score matrix (flash style, tensor cores),
// Q/K/V split with RoPE in one pass, and SiLU(gate) * up. Compiled to PTX by build.rs when
// the `cuda` feature is on; loaded through candle's custom-kernel hook (src/model/cuda.rs).
//
// Attention follows FlashAttention-2: a block of 128 query rows streams the keys in tiles of
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

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Tuning switches (defaults are what samkv ships; SAMKV_FLASH_PTX/SAMKV_FLASH_BQ load a build
// with others, see src/model/cuda/mod.rs).
#ifndef MT
#define MT 2    // m16 row tiles per warp: 2 = 32 rows, Q staged in shared memory; 1 = 16 rows, Q in registers
#endif
#define BQ (64 * MT)  // packed query rows per block: 4 warps
#ifndef MIN_BLOCKS
#define MIN_BLOCKS (MT == 1 ? 3 : 2)
#endif
#ifdef MMA_VOLATILE
#define MMA_ASM asm volatile
#else
#define MMA_ASM asm  // pure register math: let ptxas interleave it with the shared-memory loads
#endif
#define BK 64   // keys per tile
#define PAD 8   // shared-memory row padding (elements): no bank conflicts, 16-byte rows

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&v);
}

template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0,
                                                        uint32_t b1) {
    MMA_ASM(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], uint32_t b0,
                                                 uint32_t b1) {
    MMA_ASM(
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
__device__ __forceinline__ void cp_async_wait_one() {
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Rows [kt, kt + BK) of one head's (T, D) keys or values into a shared tile; rows at or past
// kend become zeros.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T (*tile)[D + PAD], const T *head, int kt, int kend) {
    for (int idx = threadIdx.x; idx < BK * D / 8; idx += blockDim.x) {
        int r = idx / (D / 8), c = (idx % (D / 8)) * 8;
        bool in = kt + r < kend;
        const T *src = head + (long long)(in ? kt + r : kt) * D + c;
        cp_async16(&tile[r][c], src, in ? 16 : 0);
    }
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
// Each warp owns 32 rows as two m16 tiles (MT = 2) that share every K and V fragment read
// from shared memory: with 16 rows per warp, shared-memory reads and not the tensor cores
// bounded the kernel. Q is staged in shared memory and read per k-step, since two tiles of Q
// in registers next to the O accumulators would spill.
template <typename T, int D>
__device__ void flash_attn(const T *__restrict__ q, const T *k, const T *v, T *__restrict__ out,
                           float *__restrict__ part, const uint32_t *__restrict__ vis,
                           const long long *__restrict__ seqs, int tq, int tk, int group,
                           int heads, long long q_hs, long long k_hs, long long v_hs,
                           float scale_log2, int split_len) {
    // Q (BQ rows), then two stages of one K and one V tile each (dynamic: 102 KiB for D = 128).
    extern __shared__ __align__(16) unsigned char smem[];
    typedef T Tile[BK][D + PAD];
    T(*sq)[D + PAD] = reinterpret_cast<T(*)[D + PAD]>(smem);
    Tile *tiles = reinterpret_cast<Tile *>(smem + (MT == 1 ? 0 : sizeof(T) * BQ * (D + PAD)));
    __shared__ int cta_vis;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int kvh = blockIdx.y;
    const int rows = tq * group;
    const bool batch = seqs != nullptr;
    // Later query blocks have more keys to visit: start them first.
    const int qblock = batch ? blockIdx.x : gridDim.x - 1 - blockIdx.x;
    const int row_lo = batch ? qblock * group : qblock * BQ;
    const int row_hi = batch ? row_lo + group : rows;  // this block's rows: [row_lo, row_hi)
    const int row0 = row_lo + warp * 16 * MT;
    if (batch) {
        const long long *e = seqs + 5 * qblock;
        k = reinterpret_cast<const T *>(e[0]);
        v = reinterpret_cast<const T *>(e[1]);
        k_hs = e[2];
        v_hs = e[3];
        tk = (int)e[4];
    }

    if (threadIdx.x == 0) cta_vis = 0;
    __syncthreads();
    for (int r = row_lo + threadIdx.x; r < min(row_lo + BQ, row_hi); r += blockDim.x)
        atomicMax(&cta_vis, vis ? (int)vis[r / group] : tk);
    __syncthreads();
    const int kbeg = blockIdx.z * split_len;
    const int kend = min(min(tk, kbeg + split_len), cta_vis);

    // Q rows into shared memory (rows past row_hi as zeros), in the first cp.async group.
    for (int idx = threadIdx.x; MT > 1 && idx < BQ * D / 8; idx += blockDim.x) {
        int r = idx / (D / 8), c = (idx % (D / 8)) * 8;
        int row = row_lo + r;
        bool ok = row < row_hi;
        int qi = ok ? row / group : 0;
        int head = kvh * group + (ok ? row % group : 0);
        cp_async16(&sq[r][c], q + head * q_hs + (long long)qi * D + c, ok ? 16 : 0);
    }

    // This thread's rows: g and g + 8 of each of the warp's m16 tiles.
    int rr[MT][2], rvis[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            rr[mt][i] = row0 + mt * 16 + g + 8 * i;
            bool ok = rr[mt][i] < row_hi;
            rvis[mt][i] = ok ? (vis ? (int)vis[rr[mt][i] / group] : tk) : 0;
        }
    // Warp-uniform: does the warp hold any of the block's rows?
    const bool active = row0 < row_hi;
#if MT == 1
    uint32_t qreg[D / 16][4];
    {
        const T *qrow[2];
        for (int i = 0; i < 2; i++) {
            bool ok = rr[0][i] < row_hi;
            int qi = ok ? rr[0][i] / group : 0;
            int head = kvh * group + (ok ? rr[0][i] % group : 0);
            qrow[i] = q + head * q_hs + (long long)qi * D;
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            int c = kk * 16 + 2 * t;
            qreg[kk][0] = rr[0][0] < row_hi ? *reinterpret_cast<const uint32_t *>(qrow[0] + c) : 0;
            qreg[kk][1] = rr[0][1] < row_hi ? *reinterpret_cast<const uint32_t *>(qrow[1] + c) : 0;
            qreg[kk][2] = rr[0][0] < row_hi ? *reinterpret_cast<const uint32_t *>(qrow[0] + c + 8) : 0;
            qreg[kk][3] = rr[0][1] < row_hi ? *reinterpret_cast<const uint32_t *>(qrow[1] + c + 8) : 0;
        }
    }
#endif

    float m[MT][2], l[MT][2];
    float o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.f;
#pragma unroll
        for (int i = 0; i < D / 8; i++) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    }
    const int mat = lane >> 3, mrow = lane & 7;

    // Double-buffered: the next tile's K and V load while this one is computed.
    const int ntiles = kend > kbeg ? (kend - kbeg + BK - 1) / BK : 0;
    if (ntiles > 0) {
        load_tile<T, D>(tiles[0], k + kvh * k_hs, kbeg, kend);
        load_tile<T, D>(tiles[1], v + kvh * v_hs, kbeg, kend);
    }
    cp_async_commit();
    for (int it = 0; it < ntiles; it++) {
        const int kt = kbeg + it * BK, st = it & 1;
        if (it + 1 < ntiles) {
            load_tile<T, D>(tiles[2 * (st ^ 1)], k + kvh * k_hs, kt + BK, kend);
            load_tile<T, D>(tiles[2 * (st ^ 1) + 1], v + kvh * v_hs, kt + BK, kend);
        }
        cp_async_commit();
        cp_async_wait_one();  // this tile's group is in (the next one may still be loading)
        __syncthreads();
        T(*ks)[D + PAD] = tiles[2 * st];
        T(*vs)[D + PAD] = tiles[2 * st + 1];
        float s[MT][BK / 8][4];
        if (active) {
            // S = Q K^T for 32 rows x BK keys; each K fragment feeds both row tiles.
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < BK / 8; nt++)
                    s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t qa[MT][4];
#if MT == 1
                qa[0][0] = qreg[kk][0], qa[0][1] = qreg[kk][1];
                qa[0][2] = qreg[kk][2], qa[0][3] = qreg[kk][3];
#else
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
                    ldmatrix_x4(qa[mt], &sq[warp * 16 * MT + mt * 16 + (lane & 15)]
                                           [kk * 16 + (lane >> 4) * 8]);
#endif
#pragma unroll
                for (int nt = 0; nt < BK / 8; nt += 2) {
                    uint32_t b[4];
                    ldmatrix_x4(b, &ks[(nt + (mat >> 1)) * 8 + mrow][kk * 16 + (mat & 1) * 8]);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma16816<T>(s[mt][nt], qa[mt], b[0], b[1]);
                        mma16816<T>(s[mt][nt + 1], qa[mt], b[2], b[3]);
                    }
                }
            }
            // Per row tile: scale to log2 units, mask what a row may not see, running max.
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                float mx[2] = {m[mt][0], m[mt][1]};
                const bool whole = kt + BK <= min(kend, min(rvis[mt][0], rvis[mt][1]));
#pragma unroll
                for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int key = kt + nt * 8 + 2 * t + (e & 1);
                        int hi = e >> 1;
                        s[mt][nt][e] = (whole || (key < rvis[mt][hi] && key < kend))
                                           ? s[mt][nt][e] * scale_log2
                                           : -INFINITY;
                        mx[hi] = fmaxf(mx[hi], s[mt][nt][e]);
                    }
                }
                float alpha[2];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    mx[i] = quad_max(mx[i]);
                    alpha[i] = mx[i] == -INFINITY ? 1.f : exp2f(m[mt][i] - mx[i]);
                    m[mt][i] = mx[i];
                    l[mt][i] *= alpha[i];
                }
#pragma unroll
                for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int hi = e >> 1;
                        float p = s[mt][nt][e] == -INFINITY ? 0.f : exp2f(s[mt][nt][e] - mx[hi]);
                        s[mt][nt][e] = p;
                        l[mt][hi] += p;
                    }
                }
#pragma unroll
                for (int dt = 0; dt < D / 8; dt++) {
                    o[mt][dt][0] *= alpha[0];
                    o[mt][dt][1] *= alpha[0];
                    o[mt][dt][2] *= alpha[1];
                    o[mt][dt][3] *= alpha[1];
                }
            }

            // O += P V: the score accumulators of key tiles 2j, 2j + 1 form P's A operand;
            // each V fragment feeds both row tiles.
#pragma unroll
            for (int j = 0; j < BK / 16; j++) {
                uint32_t pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    pa[mt][0] = pack2<T>(s[mt][2 * j][0], s[mt][2 * j][1]);
                    pa[mt][1] = pack2<T>(s[mt][2 * j][2], s[mt][2 * j][3]);
                    pa[mt][2] = pack2<T>(s[mt][2 * j + 1][0], s[mt][2 * j + 1][1]);
                    pa[mt][3] = pack2<T>(s[mt][2 * j + 1][2], s[mt][2 * j + 1][3]);
                }
#pragma unroll
                for (int dt = 0; dt < D / 8; dt += 2) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, &vs[j * 16 + (mat & 1) * 8 + mrow][dt * 8 + (mat >> 1) * 8]);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma16816<T>(o[mt][dt], pa[mt], b[0], b[1]);
                        mma16816<T>(o[mt][dt + 1], pa[mt], b[2], b[3]);
                    }
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    cp_async_wait_all();
    if (!active) return;

#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float li = quad_sum(l[mt][i]);
            const int r = rr[mt][i];
            if (r >= row_hi) continue;
            float inv = li > 0.f ? 1.f / li : 0.f;
            int qi = r / group, head = kvh * group + r % group;
            if (part == nullptr) {
                T *dst = out + (long long)qi * heads * D + head * D;
#pragma unroll
                for (int dt = 0; dt < D / 8; dt++) {
                    *reinterpret_cast<uint32_t *>(dst + dt * 8 + 2 * t) =
                        pack2<T>(o[mt][dt][2 * i] * inv, o[mt][dt][2 * i + 1] * inv);
                }
            } else {
                float *dst =
                    part + (((long long)blockIdx.z * gridDim.y + kvh) * rows + r) * (D + 2);
#pragma unroll
                for (int dt = 0; dt < D / 8; dt++) {
                    dst[dt * 8 + 2 * t] = o[mt][dt][2 * i] * inv;
                    dst[dt * 8 + 2 * t + 1] = o[mt][dt][2 * i + 1] * inv;
                }
                if (t == 0) {
                    dst[D] = m[mt][i];
                    dst[D + 1] = li;
                }
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

// __launch_bounds__(128, MIN_BLOCKS): registers capped for that many blocks per SM (three with
// 68 KiB of shared memory at MT = 1, two with 102 KiB at MT = 2).
#define FLASH(NAME, T, D)                                                                      \
    extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS)                                          \
        flash_attn_##NAME##_d##D(const T *q, const T *k, const T *v, T *out, float *part,      \
                                 const uint32_t *vis, const long long *seqs, int tq, int tk,   \
                                 int group, int heads, long long q_hs, long long k_hs,         \
                                 long long v_hs, float scale_log2, int split_len) {            \
        flash_attn<T, D>(q, k, v, out, part, vis, seqs, tq, tk, group, heads, q_hs, k_hs,      \
                         v_hs, scale_log2, split_len);                                         \
    }                                                                                          \
    extern "C" __global__ void flash_combine_##NAME##_d##D(const float *part, T *out,          \
                                                           int nsplit, int rows, int group,    \
                                                           int heads) {                        \
        flash_combine<T, D>(part, out, nsplit, rows, group, heads);                            \
    }
FLASH(bf16, __nv_bfloat16, 64)
FLASH(bf16, __nv_bfloat16, 128)
FLASH(f16, __half, 64)
FLASH(f16, __half, 128)

// y: (t, (h + 2 hkv) d) = [Q | K | V] per row, bias (nullable) its width. out: (h + 2 hkv, t, d):
// Q and K heads rotated by cos/sin (t, d/2), V heads copied. One thread per rotated pair.
template <typename T>
__device__ void qkv_rope(const T *__restrict__ y, const T *__restrict__ bias,
                         const T *__restrict__ cos, const T *__restrict__ sin, T *__restrict__ out,
                         int tt, int h, int hkv, int d, int interleaved) {
    const int half = d / 2, heads = h + 2 * hkv;
    const long long n = (long long)heads * tt * half;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        int j = idx % half;
        int r = (idx / half) % tt;
        int hh = idx / half / tt;
        int i0 = interleaved ? 2 * j : j;
        int i1 = interleaved ? 2 * j + 1 : j + half;
        const T *src = y + (long long)r * heads * d + hh * d;
        float x0 = to_f(src[i0]), x1 = to_f(src[i1]);
        if (bias) {
            x0 = to_f(from_f<T>(x0 + to_f(bias[hh * d + i0])));
            x1 = to_f(from_f<T>(x1 + to_f(bias[hh * d + i1])));
        }
        float y0 = x0, y1 = x1;
        if (hh < h + hkv) {
            float c = to_f(cos[(long long)r * half + j]), s = to_f(sin[(long long)r * half + j]);
            y0 = x0 * c - x1 * s;
            y1 = x0 * s + x1 * c;
        }
        T *dst = out + ((long long)hh * tt + r) * d;
        dst[i0] = from_f<T>(y0);
        dst[i1] = from_f<T>(y1);
    }
}

// gu: (t, 2f) = [gate | up] per row; out (t, f) = silu(gate) * up.
template <typename T>
__device__ void silu_mul(const T *__restrict__ gu, T *__restrict__ out, int tt, int f) {
    const long long n = (long long)tt * f;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        long long r = idx / f;
        int j = idx % f;
        float gate = to_f(gu[r * 2 * f + j]), up = to_f(gu[r * 2 * f + f + j]);
        out[idx] = from_f<T>(gate / (1.f + __expf(-gate)) * up);
    }
}

#define ELEMENTWISE(NAME, T)                                                                   \
    extern "C" __global__ void qkv_rope_##NAME(const T *y, const T *bias, const T *cos,        \
                                               const T *sin, T *out, int tt, int h, int hkv,   \
                                               int d, int interleaved) {                       \
        qkv_rope<T>(y, bias, cos, sin, out, tt, h, hkv, d, interleaved);                       \
    }                                                                                          \
    extern "C" __global__ void silu_mul_##NAME(const T *gu, T *out, int tt, int f) {           \
        silu_mul<T>(gu, out, tt, f);                                                           \
    }
ELEMENTWISE(f32, float)
ELEMENTWISE(bf16, __nv_bfloat16)
ELEMENTWISE(f16, __half)
