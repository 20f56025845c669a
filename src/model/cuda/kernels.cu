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

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <limits.h>

#define BQ 64   // packed query rows per block: 4 warps x 16 (measured faster than 8 x 16, and
                // than 4 x 32 with Q in shared memory: docs/PERFORMANCE.md)
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
template <typename T, int D>
__device__ void flash_attn(const T *__restrict__ q, const T *k, const T *v, T *__restrict__ out,
                           float *__restrict__ part, const uint32_t *__restrict__ vis,
                           const long long *__restrict__ seqs, int tq, int tk, int group,
                           int heads, long long q_hs, long long k_hs, long long v_hs,
                           float scale_log2, int split_len) {
    // Two stages of one K and one V tile each (dynamic: 68 KiB for D = 128).
    extern __shared__ __align__(16) unsigned char smem[];
    typedef T Tile[BK][D + PAD];
    Tile *tiles = reinterpret_cast<Tile *>(smem);  // [stage * 2] = K, [stage * 2 + 1] = V
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
    if (batch) {
        const long long *e = seqs + 5 * qblock;
        k = reinterpret_cast<const T *>(e[0]);
        v = reinterpret_cast<const T *>(e[1]);
        k_hs = e[2];
        v_hs = e[3];
        tk = (int)e[4];
    }

    if (threadIdx.x == 0) cta_vis = 0, cta_min_vis = INT_MAX;
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
    const bool active = row0 < row_hi;

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
        // S = Q K^T for 16 rows x BK keys.
        float s[BK / 8][4];
        if (active) {
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
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
        if (active) {
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
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    cp_async_wait_all();
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

// The 2-byte types' paths below move 16 bytes (8 elements) per load and store: one element per
// thread left these memory-bound kernels at a third of the H200's bandwidth.
template <typename T> struct Vec8 {
    T e[8];
};
template <typename T> __device__ __forceinline__ Vec8<T> ld8(const T *p) {
    uint4 u = *reinterpret_cast<const uint4 *>(p);
    return *reinterpret_cast<Vec8<T> *>(&u);
}
template <typename T> __device__ __forceinline__ void st8(T *p, const Vec8<T> &v) {
    *reinterpret_cast<uint4 *>(p) = *reinterpret_cast<const uint4 *>(&v);
}

__device__ __forceinline__ void rotate(float &x0, float &x1, float c, float s) {
    float y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
    x0 = y0;
    x1 = y1;
}

// qkv_rope for 2-byte T with d / 2 a multiple of 8: one thread per 8 rotated pairs. Split
// halves: pairs j..j+7 are elements j.. and half + j..; interleaved: elements 2j.. hold 4
// pairs, so a thread takes 16 elements as two chunks of 8. Same arithmetic as qkv_rope.
template <typename T>
__device__ void qkv_rope_v8(const T *__restrict__ y, const T *__restrict__ bias,
                            const T *__restrict__ cos, const T *__restrict__ sin,
                            T *__restrict__ out, int tt, int h, int hkv, int d, int interleaved) {
    const int half = d / 2, heads = h + 2 * hkv, chunks = half / 8;
    const long long n = (long long)heads * tt * chunks;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        int c = idx % chunks;
        int r = (idx / chunks) % tt;
        int hh = idx / chunks / tt;
        const T *src = y + (long long)r * heads * d + hh * d;
        T *dst = out + ((long long)hh * tt + r) * d;
        // Element offsets of the two chunks: [a, a + 8) and [b, b + 8).
        const int a = interleaved ? 16 * c : 8 * c, b = interleaved ? 16 * c + 8 : half + 8 * c;
        Vec8<T> xa = ld8(src + a), xb = ld8(src + b);
        float fa[8], fb[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            fa[e] = to_f(xa.e[e]);
            fb[e] = to_f(xb.e[e]);
        }
        if (bias) {
            Vec8<T> ba = ld8(bias + hh * d + a), bb = ld8(bias + hh * d + b);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                fa[e] = to_f(from_f<T>(fa[e] + to_f(ba.e[e])));
                fb[e] = to_f(from_f<T>(fb[e] + to_f(bb.e[e])));
            }
        }
        if (hh < h + hkv) {
            Vec8<T> cv = ld8(cos + (long long)r * half + 8 * c);
            Vec8<T> sv = ld8(sin + (long long)r * half + 8 * c);
            if (interleaved) {
#pragma unroll
                for (int p = 0; p < 4; p++) {
                    rotate(fa[2 * p], fa[2 * p + 1], to_f(cv.e[p]), to_f(sv.e[p]));
                    rotate(fb[2 * p], fb[2 * p + 1], to_f(cv.e[4 + p]), to_f(sv.e[4 + p]));
                }
            } else {
#pragma unroll
                for (int p = 0; p < 8; p++) rotate(fa[p], fb[p], to_f(cv.e[p]), to_f(sv.e[p]));
            }
        }
#pragma unroll
        for (int e = 0; e < 8; e++) {
            xa.e[e] = from_f<T>(fa[e]);
            xb.e[e] = from_f<T>(fb[e]);
        }
        st8(dst + a, xa);
        st8(dst + b, xb);
    }
}

// silu_mul for 2-byte T with f a multiple of 8: one thread per 8 outputs.
template <typename T>
__device__ void silu_mul_v8(const T *__restrict__ gu, T *__restrict__ out, int tt, int f) {
    const int fv = f / 8;
    const long long n = (long long)tt * fv;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        long long r = idx / fv;
        int j = (idx % fv) * 8;
        Vec8<T> g = ld8(gu + r * 2 * f + j), u = ld8(gu + r * 2 * f + f + j), o;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float gate = to_f(g.e[e]);
            o.e[e] = from_f<T>(gate / (1.f + __expf(-gate)) * to_f(u.e[e]));
        }
        st8(out + r * f + j, o);
    }
}

// The residual add and the RMS norm after it, one block per row of n (a multiple of 8):
// sum = x + a (rounded to T, as candle's add), out = sum * rsqrt(mean(sum^2) + eps) * w with
// the mean in f32 (as candle's rms_norm). Both go to `so`: sum in rows [0, t), out in [t, 2t).
template <typename T>
__device__ void add_rms_norm(const T *__restrict__ x, const T *__restrict__ a,
                             const T *__restrict__ w, T *__restrict__ so, int tt, int n,
                             float eps) {
    const long long r = blockIdx.x;
    const T *xr = x + r * n, *ar = a + r * n;
    T *sr = so + r * n, *orow = so + ((long long)tt + r) * n;
    float ss = 0.f;
    for (int j = threadIdx.x * 8; j < n; j += blockDim.x * 8) {
        Vec8<T> xv = ld8(xr + j), av = ld8(ar + j), sv;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            sv.e[e] = from_f<T>(to_f(xv.e[e]) + to_f(av.e[e]));
            float v = to_f(sv.e[e]);
            ss += v * v;
        }
        st8(sr + j, sv);
    }
    __shared__ float part[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (threadIdx.x == 0) part[0] = v;
    }
    __syncthreads();
    const float scale = rsqrtf(part[0] / n + eps);
    for (int j = threadIdx.x * 8; j < n; j += blockDim.x * 8) {
        Vec8<T> sv = ld8(sr + j), wv = ld8(w + j), ov;
#pragma unroll
        for (int e = 0; e < 8; e++) ov.e[e] = from_f<T>(to_f(sv.e[e]) * scale * to_f(wv.e[e]));
        st8(orow + j, ov);
    }
}

#define ELEMENTWISE_V8(NAME, T)                                                                \
    extern "C" __global__ void qkv_rope_v8_##NAME(const T *y, const T *bias, const T *cos,     \
                                                  const T *sin, T *out, int tt, int h,         \
                                                  int hkv, int d, int interleaved) {           \
        qkv_rope_v8<T>(y, bias, cos, sin, out, tt, h, hkv, d, interleaved);                    \
    }                                                                                          \
    extern "C" __global__ void silu_mul_v8_##NAME(const T *gu, T *out, int tt, int f) {        \
        silu_mul_v8<T>(gu, out, tt, f);                                                        \
    }                                                                                          \
    extern "C" __global__ void add_rms_norm_##NAME(const T *x, const T *a, const T *w, T *so,  \
                                                   int tt, int n, float eps) {                 \
        add_rms_norm<T>(x, a, w, so, tt, n, eps);                                              \
    }
ELEMENTWISE_V8(bf16, __nv_bfloat16)
ELEMENTWISE_V8(f16, __half)

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

// ---------------------------------------------------------------------------------------
// Stored KV rows into a request's cache, moved to their global positions.
//
// For every (layer, row) of the output, the stored key is rotated by its segment's position
// delta (RoPE rotations compose) and the value copied: what Reuse and the sparse methods do
// before any attention, in one launch instead of a RoPE and two copies per (layer, segment).
//   src:     per (layer, segment): K pointer, V pointer, K head stride, V head stride
//            (elements; rows are packed, d apart)
//   ranges:  per layer: first entry, rows (layers with equal row sets share entries)
//   entries: per row: segment, row in the segment's stored cache
//   cs:      per segment: cos[d / 2] then sin[d / 2] of its delta, f32
//   out:     (layers, 2, h, cap, d): rows 0..rows of each layer's K then V
// One block per output row (looping when rows exceed the grid), threads over (head, pair).
template <typename T>
__device__ void gather_kv(const long long *__restrict__ src, const unsigned *__restrict__ ranges,
                          const unsigned *__restrict__ entries, const float *__restrict__ cs,
                          T *__restrict__ out, int nseg, int h, int cap, int d, int interleaved) {
    const int layer = blockIdx.y, half = d / 2, pairs = h * half;
    const unsigned first = ranges[2 * layer], rows = ranges[2 * layer + 1];
    T *ok = out + (size_t)layer * 2 * h * cap * d;
    T *ov = ok + (size_t)h * cap * d;
    for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
        const unsigned seg = entries[2 * (first + r)], row = entries[2 * (first + r) + 1];
        const long long *e = src + 4 * ((long long)layer * nseg + seg);
        const T *k = reinterpret_cast<const T *>(e[0]) + (size_t)row * d;
        const T *v = reinterpret_cast<const T *>(e[1]) + (size_t)row * d;
        const float *c = cs + (size_t)seg * d;
        for (int j = threadIdx.x; j < pairs; j += blockDim.x) {
            const int head = j / half, i = j % half;
            const int i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + half;
            const T *kr = k + head * e[2], *vr = v + head * e[3];
            float x0 = to_f(kr[i0]), x1 = to_f(kr[i1]);
            rotate(x0, x1, c[i], c[half + i]);
            const size_t o = ((size_t)head * cap + r) * d;
            ok[o + i0] = from_f<T>(x0);
            ok[o + i1] = from_f<T>(x1);
            ov[o + i0] = vr[i0];
            ov[o + i1] = vr[i1];
        }
    }
}

#define GATHER(NAME, T)                                                                        \
    extern "C" __global__ void gather_kv_##NAME(const long long *src, const unsigned *ranges,   \
                                                const unsigned *entries, const float *cs,      \
                                                T *out, int nseg, int h, int cap, int d,       \
                                                int interleaved) {                             \
        gather_kv<T>(src, ranges, entries, cs, out, nseg, h, cap, d, interleaved);             \
    }
GATHER(f32, float)
GATHER(bf16, __nv_bfloat16)
GATHER(f16, __half)

// ---------------------------------------------------------------------------------------
// Rows of a KV buffer overwritten in place: dst[head, rows[j], :] = src[head, j, :].
// candle's scatter runs one thread per (head, dim) looping over the rows: 1024 threads for
// an 8B layer, 0.3 ms for 800 rows. Here one thread per element. T is a same-size carrier
// (the values are copied, not computed on).
template <typename T>
__device__ void scatter_rows(const T *__restrict__ src, const unsigned *__restrict__ rows,
                             T *__restrict__ dst, int h, int n, int d, long long src_hs,
                             long long dst_hs) {
    const long long total = (long long)h * n * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int c = (int)(i % d);
        const long long r = i / d;
        const int j = (int)(r % n), head = (int)(r / n);
        dst[head * dst_hs + (long long)rows[j] * d + c] = src[head * src_hs + (long long)j * d + c];
    }
}

extern "C" __global__ void scatter_rows_b16(const unsigned short *src, const unsigned *rows,
                                            unsigned short *dst, int h, int n, int d,
                                            long long src_hs, long long dst_hs) {
    scatter_rows<unsigned short>(src, rows, dst, h, n, d, src_hs, dst_hs);
}
extern "C" __global__ void scatter_rows_b32(const unsigned *src, const unsigned *rows,
                                            unsigned *dst, int h, int n, int d, long long src_hs,
                                            long long dst_hs) {
    scatter_rows<unsigned>(src, rows, dst, h, n, d, src_hs, dst_hs);
}
