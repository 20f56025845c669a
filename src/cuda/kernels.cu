// samkv's own CUDA kernels: attention without a score matrix (flash.cuh, instantiated here with
// mma.sync for any GPU from Ampere on; flash_sm90.cu instantiates it with Hopper's wgmma), the
// Q/K/V split with RoPE, SiLU(gate) * up, the residual add with RMS norm, and the K/V gather and
// row scatter of the request cache. Compiled to PTX by build.rs when the `cuda` feature is on;
// loaded through candle's custom-kernel hook (src/model/cuda/mod.rs).

#include "flash.cuh"

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
