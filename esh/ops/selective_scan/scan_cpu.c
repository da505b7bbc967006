/* The selective scan on the CPU, fused: forward and backward. One pass over the sequence per
 * block of 16 channels, the state (N x 16 floats) kept in registers and L1, nothing of size
 * L x N ever written to memory. Built on first use by esh/ops/selective_scan/cpu_kernel.py with
 * the system C compiler (-O3 -march=native -ffast-math -fopenmp); the decays' exponentials are
 * inlined (esh_exp2f) and vectorise with the rest.
 *
 *   dt[t]   = softplus(delta[t] + bias)             (or delta[t] + bias)
 *   h[t, n] = exp2(dt[t] * A2[n]) * h[t-1, n] + dt[t] * u[t] * B[t, n]
 *   y[t]    = sum_n C[t, n] * h[t, n] + D * u[t]
 *   out[t]  = y[t] * silu(z[t])                     (or y[t])
 *
 * with A2 = A * log2(e). Layouts (all contiguous, float32):
 *   u, delta, z, out (batch, L, dim)      sequence-major, as the mixers produce them, or all
 *                    (batch, dim, L) channel-major (seq_major = 0), which the loops read and
 *                    write through 16 x 16 transposed tiles (transpose16)
 *   A2               (N, dim)
 *   Bm               (batch, L, GB, N)    one B per group of dim / GB channels
 *   Cm               (batch, L, GC, N)    one C per group of dim / GC channels
 *   Dv, bias         (dim) or NULL
 *   z                (batch, L, dim) or NULL: the gate
 *   h_last           (batch, dim, N) or NULL: the final state
 *   h_init           (batch, dim, N) or NULL: the state before the first step (else zero), so
 *                    that a long sequence can be scanned piece by piece
 *   ckpt             (batch, ceil(L / K), dim / W, N, W) or NULL: for a backward, the state
 *                    entering every K-th step
 * dim / GB and dim / GC must be multiples of W and N at most ESH_MAX_N (cpu_kernel.py's BLOCK
 * and MAX_STATES, which the Python side checks).
 *
 * The backward (esh_scan_bwd_f32) walks each block's sequence in reverse, K steps at a time:
 * it recomputes the K states from the chunk's checkpoint (kept with their decays in a per-block
 * buffer that stays in L2), then runs the adjoint recurrence
 *   g[t] = dL/dh[t] = C[t] dy[t] + a[t+1] g[t+1]
 * and writes every gradient from it. Sums over channels (dB, dC) and over the batch (dA, dD,
 * d(bias)) are written as per-block and per-batch partials that esh_scan_reduce_f32 adds in a
 * fixed order: the same bits on every run, whatever the number of threads.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "esh_math.h"

#define W 16
#define ESH_MAX_N 64

/* W floats as one vector (GCC/Clang vector extensions): the backward's sums over the states
 * stay in registers instead of going through memory from one state to the next. */
typedef float v16 __attribute__((vector_size(W * sizeof(float))));

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

static inline float sum16(v16 v) {
    float s = 0.0f;
    for (int k = 0; k < W; ++k) s += v[k];
    return s;
}

/* dst[j * ds + k] = src[k * ss + j] for j, k < 16: a 16 x 16 transpose in registers, four stages
 * that each swap one bit of the row and the column index. Channel-major (batch, dim, L) memory
 * goes through it 16 steps at a time: 16 vector loads, the transpose and 16 stores in place of
 * 256 single-float gathers. */
typedef int32_t vi16 __attribute__((vector_size(W * sizeof(int32_t))));
#if defined(__clang__)
#define ESH_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define ESH_SHUF(a, b, ...) __builtin_shuffle(a, b, (vi16){__VA_ARGS__})
#endif

/* Stage b of the transpose: rows i and i + b (bit b of i clear) trade the elements whose column
 * has bit b set in row i for those whose column has it clear in row i + b. */
#define ESH_LO(b, p) (((p) & (b)) ? 16 + (p) - (b) : (p))
#define ESH_HI(b, p) (((p) & (b)) ? 16 + (p) : (p) + (b))
#define ESH_TRANSPOSE_STAGE(r, b)                                                                                             \
    for (int i = 0; i < W; ++i)                                                                                               \
        if (!(i & (b))) {                                                                                                     \
            const v16 lo = r[i], hi = r[i + (b)];                                                                             \
            r[i] = ESH_SHUF(lo, hi, ESH_LO(b, 0), ESH_LO(b, 1), ESH_LO(b, 2), ESH_LO(b, 3), ESH_LO(b, 4), ESH_LO(b, 5),       \
                            ESH_LO(b, 6), ESH_LO(b, 7), ESH_LO(b, 8), ESH_LO(b, 9), ESH_LO(b, 10), ESH_LO(b, 11),             \
                            ESH_LO(b, 12), ESH_LO(b, 13), ESH_LO(b, 14), ESH_LO(b, 15));                                      \
            r[i + (b)] = ESH_SHUF(lo, hi, ESH_HI(b, 0), ESH_HI(b, 1), ESH_HI(b, 2), ESH_HI(b, 3), ESH_HI(b, 4), ESH_HI(b, 5), \
                                  ESH_HI(b, 6), ESH_HI(b, 7), ESH_HI(b, 8), ESH_HI(b, 9), ESH_HI(b, 10), ESH_HI(b, 11),       \
                                  ESH_HI(b, 12), ESH_HI(b, 13), ESH_HI(b, 14), ESH_HI(b, 15));                                \
        }

static inline void transpose16(const float *src, int64_t ss, float *dst, int64_t ds) {
    v16 r[W];
    for (int i = 0; i < W; ++i) r[i] = load16(src + i * ss);
    ESH_TRANSPOSE_STAGE(r, 1)
    ESH_TRANSPOSE_STAGE(r, 2)
    ESH_TRANSPOSE_STAGE(r, 4)
    ESH_TRANSPOSE_STAGE(r, 8)
    for (int i = 0; i < W; ++i) store16(dst + i * ds, r[i]);
}

/* Steps t .. t + T - 1 of a block's W channels in channel-major memory (channel k's at
 * x[k * sd + j]) to and from a (T, W) buffer of rows: 16 steps at a time through transpose16. */
static inline void tile_in(const float *x, int64_t sd, int64_t T, float *buf) {
    int64_t j = 0;
    for (; j + W <= T; j += W) transpose16(x + j, sd, buf + j * W, W);
    for (; j < T; ++j)
        for (int k = 0; k < W; ++k) buf[j * W + k] = x[k * sd + j];
}

static inline void tile_out(const float *buf, int64_t T, float *x, int64_t sd) {
    int64_t j = 0;
    for (; j + W <= T; j += W) transpose16(buf + j * W, W, x + j, sd);
    for (; j < T; ++j)
        for (int k = 0; k < W; ++k) x[k * sd + j] = buf[j * W + k];
}

/* log(1 + y) for 0 <= y <= 1: 2 atanh(s) with s = y / (2 + y) <= 1/3, by its series to s^17
 * (truncation below 2e-10 relative). */
static inline float log1p_unit(float y) {
    const float s = y / (2.0f + y), s2 = s * s;
    float p = 1.0f / 17.0f;
    p = p * s2 + 1.0f / 15.0f;
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

/* softplus(x) = log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), given e = e^-|x| (which the
 * backward also needs for the slope). */
static inline float softplus_e(float x, float e) { return fmaxf(x, 0.0f) + log1p_unit(e); }

static inline float softplus_f(float x) { return softplus_e(x, esh_expf(-fabsf(x))); }

#define ESH_ALWAYS_INLINE static inline __attribute__((always_inline))

/* Asks for the cache lines of step tp of a block to be fetched ahead of their use, in an array
 * of u's layout (see fwd_item) whose block starts at x + base: the rows of one block are a page
 * or more apart, which the hardware prefetchers do not follow. Sequence-major (sd == 1) a row
 * is one line. Channel-major a line holds 16 steps of one channel, so the call fetches channel
 * k's lines for steps tp .. tp + 15: W calls with k = 0 .. W - 1 cover the block. */
#define ESH_PREFETCH(p, rw)                   \
    do {                                      \
        if (rw)                               \
            __builtin_prefetch((p), 1, 3);    \
        else                                  \
            __builtin_prefetch((p), 0, 3);    \
    } while (0) /* the builtin's arguments must be constants where it is compiled (clang) */

ESH_ALWAYS_INLINE void prefetch_step(const float *x, int64_t base, int64_t tp, int64_t L, const int64_t st,
                                     const int64_t sd, int k, const int rw) {
    if (!x) return;
    if (sd == 1) {
        ESH_PREFETCH(x + base + tp * st, rw);
    } else {
        const float *p = x + base + k * sd + tp;
        ESH_PREFETCH(p, rw);
        ESH_PREFETCH(p + (tp + W - 1 < L ? W - 1 : L - 1 - tp), rw);
    }
}

#define ESH_PREFETCH_STEPS 16 /* how far ahead the forward prefetches */

/* One step of the forward for one block: the inputs' and outputs' W values at p[0 .. W - 1]. */
ESH_ALWAYS_INLINE void fwd_step(const float *pd, const float *pu, const float *pz, float *py, const float *bt,
                                const float *ct, float (*h)[W], float (*a2)[W], const float *bias_k,
                                const float *D_k, int64_t N, int softplus) {
    float dt[W], dtu[W], acc[W];
#pragma omp simd
    for (int k = 0; k < W; ++k) {
        float x = pd[k] + bias_k[k];
        if (softplus) x = softplus_f(x);
        dt[k] = x;
        dtu[k] = x * pu[k];
        acc[k] = D_k[k] * pu[k];
    }
    for (int64_t n = 0; n < N; ++n) {
        const float bn = bt[n], cn = ct[n];
#pragma omp simd
        for (int k = 0; k < W; ++k) {
            const float hn = esh_exp2f(dt[k] * a2[n][k]) * h[n][k] + dtu[k] * bn;
            h[n][k] = hn;
            acc[k] += cn * hn;
        }
    }
    if (pz) {
#pragma omp simd
        for (int k = 0; k < W; ++k) {
            const float zk = pz[k];
            py[k] = acc[k] * zk * esh_sigmoidf(zk);
        }
    } else {
        for (int k = 0; k < W; ++k) py[k] = acc[k];
    }
}

/* One block of W channels of one sequence; (b * L * dim + t * st + d * sd) is the offset of
 * (b, t, d) in u, delta, z and y: st = dim, sd = 1 sequence-major, st = 1, sd = L channel-major
 * (the two callers below pass them as constants, so each layout gets its own compiled loop). */
ESH_ALWAYS_INLINE void fwd_item(const float *u, const float *delta, const float *A2, const float *Bm,
                                const float *Cm, const float *Dv, const float *bias, const float *z,
                                int softplus, float *y, float *h_last, const float *h_init, float *ckpt,
                                int64_t K, int64_t nchunks, int64_t L, int64_t dim, int64_t N, int64_t GB,
                                int64_t GC, int64_t item, const int64_t st, const int64_t sd) {
    const int64_t blocks = dim / W;
    const int64_t b = item / blocks;
    const int64_t blk = item % blocks;
    const int64_t d0 = blk * W;
    const int64_t gb = d0 / (dim / GB), gc = d0 / (dim / GC);
    float h[ESH_MAX_N][W];
    float a2[ESH_MAX_N][W];
    float bias_k[W], D_k[W];
    const int tiles = sd != 1; /* channel-major: 16 steps at a time through transposed tiles */
    float tdelta[W * W], tu[W * W], tz[W * W], ty[W * W];
    for (int64_t n = 0; n < N; ++n)
        for (int k = 0; k < W; ++k) {
            h[n][k] = h_init ? h_init[(b * dim + d0 + k) * N + n] : 0.0f;
            a2[n][k] = A2[n * dim + d0 + k];
        }
    for (int k = 0; k < W; ++k) {
        bias_k[k] = bias ? bias[d0 + k] : 0.0f;
        D_k[k] = Dv ? Dv[d0 + k] : 0.0f;
    }
    for (int64_t t = 0; t < L; ++t) {
        if (ckpt && t % K == 0) {
            float *dst = ckpt + ((b * nchunks + t / K) * blocks + blk) * N * W;
            for (int64_t n = 0; n < N; ++n)
                for (int k = 0; k < W; ++k) dst[n * W + k] = h[n][k];
        }
        const float *bt = Bm + ((b * L + t) * GB + gb) * N;
        const float *ct = Cm + ((b * L + t) * GC + gc) * N;
        const int64_t tp = t + ESH_PREFETCH_STEPS;
        if (tp < L) {
            const int64_t base = b * L * dim + d0 * sd;
            const int k = (int)(t % W);
            prefetch_step(delta, base, tp, L, st, sd, k, 0);
            prefetch_step(u, base, tp, L, st, sd, k, 0);
            prefetch_step(z, base, tp, L, st, sd, k, 0);
            prefetch_step(y, base, tp, L, st, sd, k, 1);
            __builtin_prefetch(bt + ESH_PREFETCH_STEPS * GB * N, 0, 3);
            __builtin_prefetch(ct + ESH_PREFETCH_STEPS * GC * N, 0, 3);
        }
        if (tiles) { /* channel-major: this step's row of a transposed tile of up to W steps */
            const int64_t jt = t % W, t1 = t - jt;
            const int64_t at = b * L * dim + d0 * sd + t1; /* channel 0, the tile's first step */
            const int64_t T = L - t1 < W ? L - t1 : W;
            if (jt == 0) {
                tile_in(delta + at, sd, T, tdelta);
                tile_in(u + at, sd, T, tu);
                if (z) tile_in(z + at, sd, T, tz);
            }
            fwd_step(tdelta + jt * W, tu + jt * W, z ? tz + jt * W : 0, ty + jt * W, bt, ct, h, a2, bias_k, D_k, N,
                     softplus);
            if (jt == T - 1) tile_out(ty, T, y + at, sd);
        } else {
            const int64_t row = b * L * dim + t * st + d0 * sd;
            fwd_step(delta + row, u + row, z ? z + row : 0, y + row, bt, ct, h, a2, bias_k, D_k, N, softplus);
        }
    }
    if (h_last)
        for (int k = 0; k < W; ++k)
            for (int64_t n = 0; n < N; ++n) h_last[(b * dim + d0 + k) * N + n] = h[n][k];
}

void esh_scan_fwd_f32(const float *u, const float *delta, const float *A2, const float *Bm, const float *Cm,
                      const float *Dv, const float *bias, const float *z, int softplus, float *y, float *h_last,
                      const float *h_init, float *ckpt, int64_t K, int64_t batch, int64_t L, int64_t dim,
                      int64_t N, int64_t GB, int64_t GC, int seq_major, int nthreads) {
    const int64_t items = batch * (dim / W);
    const int64_t nchunks = ckpt ? (L + K - 1) / K : 0;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t item = 0; item < items; ++item) {
        if (seq_major)
            fwd_item(u, delta, A2, Bm, Cm, Dv, bias, z, softplus, y, h_last, h_init, ckpt, K, nchunks, L, dim, N, GB,
                     GC, item, dim, 1);
        else
            fwd_item(u, delta, A2, Bm, Cm, Dv, bias, z, softplus, y, h_last, h_init, ckpt, K, nchunks, L, dim, N, GB,
                     GC, item, 1, L);
    }
}

/* Gradients of sum(out * dout) + sum(h_last * dlast), dout (batch, L, dim), dlast (batch, dim, N)
 * or NULL, from the forward's checkpoints (K steps apart); with z, y before the gate is recomputed
 * from the chunk's states (C h + D u), not kept by the forward. Written:
 *   du, ddelta, dz (dz only with z)  (batch, L, dim)
 *   dA_part                          (batch, N, dim): summed over the batch by the caller
 *   dD_part, dbias_part              (batch, dim) or NULL: likewise
 *   dB_part                          (batch, dim / W, L, N): per block of W channels, summed
 *                                    over the blocks of a B group by the caller
 *   dC_part                          (batch, dim / W, L, N): likewise for C's groups
 *   dh0                              (batch, dim, N) or NULL: the gradient of h_init
 * Each item needs 2 K N W + 2 K W floats of scratch (and 7 K W channel-major) (malloc'ed); returns
 * the number of items whose scratch could not be allocated (their gradients are then unwritten:
 * the caller raises).
 * u, delta, z, dout, du, ddelta and dz share one layout: seq_major, else (batch, dim, L). */
/* One block of W channels of one sequence (layouts as for fwd_item); returns 1 when its
 * scratch could not be allocated. */
ESH_ALWAYS_INLINE int bwd_item(const float *u, const float *delta, const float *A2, const float *Bm,
                               const float *Cm, const float *Dv, const float *bias, const float *z,
                               int softplus, const float *dout, const float *dlast,
                               const float *ckpt, int64_t K, float *du, float *ddelta, float *dz,
                               float *dA_part, float *dD_part, float *dbias_part,
                               float *dB_part, float *dC_part, float *dh0, int64_t L, int64_t dim, int64_t N,
                               int64_t GB, int64_t GC, int64_t item, const int64_t st, const int64_t sd) {
    const int64_t blocks = dim / W;
    const int64_t nchunks = (L + K - 1) / K;
    const float LN2 = 0.6931471805599453f;
    const int64_t b = item / blocks;
    const int64_t blk = item % blocks;
    const int64_t d0 = blk * W;
    const int64_t gb = d0 / (dim / GB), gc = d0 / (dim / GC);
    const int tiles = sd != 1; /* channel-major: each chunk's rows through transposed tiles */
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(K * W * (2 * N + 2 + (tiles ? 7 : 0))));
    if (!scratch) return 1;
    float *hs = scratch;             /* (K, N, W): the states after each step of the chunk */
    float *as = hs + K * N * W;      /* (K, N, W): the decays of each step */
    float *dts = as + K * N * W;     /* (K, W): the steps */
    float *dsp = dts + K * W;        /* (K, W): d(step)/d(delta + bias), the softplus's slope */
    float *tile = dsp + K * W;       /* channel-major: (K, W) rows of delta, u, dout, z, du, ddelta, dz */
    float g[ESH_MAX_N][W];           /* the adjoint of the state */
    float a2[ESH_MAX_N][W], dA_acc[ESH_MAX_N][W];
    float bias_k[W], D_k[W], dD_acc[W], dbias_acc[W];
    for (int64_t n = 0; n < N; ++n)
        for (int k = 0; k < W; ++k) {
            g[n][k] = dlast ? dlast[(b * dim + d0 + k) * N + n] : 0.0f;
            a2[n][k] = A2[n * dim + d0 + k];
            dA_acc[n][k] = 0.0f;
        }
    for (int k = 0; k < W; ++k) {
        bias_k[k] = bias ? bias[d0 + k] : 0.0f;
        D_k[k] = Dv ? Dv[d0 + k] : 0.0f;
        dD_acc[k] = 0.0f;
        dbias_acc[k] = 0.0f;
    }
    float *dBp = dB_part + (b * blocks + blk) * L * N;
    float *dCp = dC_part + (b * blocks + blk) * L * N;
    for (int64_t c = nchunks - 1; c >= 0; --c) {
        const int64_t t0 = c * K;
        const int64_t T = (L - t0) < K ? (L - t0) : K;
        const float *h0 = ckpt + ((b * nchunks + c) * blocks + blk) * N * W;
        /* the chunk's rows: (b, t0 + j, d0 + k) at x[j * rs + k] of x = its own memory sequence-major,
         * a transposed copy channel-major */
        const int64_t at = b * L * dim + t0 * st + d0 * sd;
        const float *xdelta = delta + at, *xu = u + at, *xdout = dout + at, *xz = z ? z + at : 0;
        float *xdu = du + at, *xddelta = ddelta + at, *xdz = dz ? dz + at : 0;
        int64_t rs = st;
        if (tiles) {
            float *cd = tile, *cu = tile + K * W, *co = tile + 2 * K * W, *cz = tile + 3 * K * W;
            tile_in(delta + at, sd, T, cd);
            tile_in(u + at, sd, T, cu);
            tile_in(dout + at, sd, T, co);
            if (z) tile_in(z + at, sd, T, cz);
            xdelta = cd, xu = cu, xdout = co, xz = z ? cz : 0;
            xdu = tile + 4 * K * W, xddelta = tile + 5 * K * W, xdz = z ? tile + 6 * K * W : 0;
            rs = W;
        }
        /* recompute the chunk's steps, decays and states */
        for (int64_t j = 0; j < T; ++j) {
            const int64_t t = t0 + j;
            const int64_t row = j * rs;
            const float *bt = Bm + ((b * L + t) * GB + gb) * N;
            float *hj = hs + j * N * W, *aj = as + j * N * W;
            const float *hp = j ? hj - N * W : h0;
            if (c) { /* the same step of the chunk done next */
                const int64_t base = b * L * dim + d0 * sd, tp = t - K;
                const int k = (int)(j % W);
                prefetch_step(delta, base, tp, L, st, sd, k, 0);
                prefetch_step(u, base, tp, L, st, sd, k, 0);
                prefetch_step(dout, base, tp, L, st, sd, k, 0);
                prefetch_step(z, base, tp, L, st, sd, k, 0);
                prefetch_step(du, base, tp, L, st, sd, k, 1);
                prefetch_step(ddelta, base, tp, L, st, sd, k, 1);
                prefetch_step(dz, base, tp, L, st, sd, k, 1);
                __builtin_prefetch(bt - K * GB * N, 0, 3);
                __builtin_prefetch(Cm + ((b * L + tp) * GC + gc) * N, 0, 3);
            }
            float dt[W], dtu[W];
#pragma omp simd
            for (int k = 0; k < W; ++k) {
                float x = xdelta[row + k] + bias_k[k];
                float slope = 1.0f;
                if (softplus) { /* softplus and its slope e^x / (1 + e^x), from one e^-|x| */
                    const float e = esh_expf(-fabsf(x));
                    slope = x > 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
                    x = softplus_e(x, e);
                }
                dt[k] = x;
                dts[j * W + k] = x;
                dsp[j * W + k] = slope;
                dtu[k] = x * xu[row + k];
            }
            for (int64_t n = 0; n < N; ++n) {
                const float bn = bt[n];
#pragma omp simd
                for (int k = 0; k < W; ++k) {
                    const float a = esh_exp2f(dt[k] * a2[n][k]);
                    aj[n * W + k] = a;
                    hj[n * W + k] = a * hp[n * W + k] + dtu[k] * bn;
                }
            }
        }
        /* the adjoint recurrence, from the chunk's last step back to its first */
        for (int64_t j = T - 1; j >= 0; --j) {
            const int64_t t = t0 + j;
            const int64_t row = j * rs;
            const float *bt = Bm + ((b * L + t) * GB + gb) * N;
            const float *ct = Cm + ((b * L + t) * GC + gc) * N;
            const float *hj = hs + j * N * W, *aj = as + j * N * W;
            const float *hp = j ? hj - N * W : h0;
            float dt[W], uk[W], dtu[W], dy[W], ddtu[W], ddt[W], du_y[W], dz_y[W];
#pragma omp simd
            for (int k = 0; k < W; ++k) {
                dt[k] = dts[j * W + k];
                uk[k] = xu[row + k];
                dtu[k] = dt[k] * uk[k];
                dy[k] = xdout[row + k];
                ddtu[k] = 0.0f;
                ddt[k] = 0.0f;
                du_y[k] = D_k[k] * uk[k]; /* y = C h + D u, before the gate */
            }
            if (z) { /* out = y silu(z): dz = dout y silu'(z), dy = dout silu(z) */
#pragma omp simd
                for (int k = 0; k < W; ++k) {
                    const float zk = xz[row + k];
                    const float s = esh_sigmoidf(zk);
                    dz_y[k] = dy[k] * s * (1.0f + zk * (1.0f - s));
                    dy[k] *= zk * s;
                }
            }
            const v16 dyv = load16(dy), dtuv = load16(dtu), dtv = load16(dt);
            v16 ddtuv = load16(ddtu), ddtv = load16(ddt), yv = load16(du_y);
            for (int64_t n = 0; n < N; ++n) {
                const v16 a = load16(aj + n * W), hn = load16(hj + n * W);
                const v16 gn = load16(g[n]) + ct[n] * dyv;
                dCp[t * N + n] = sum16(hn * dyv);
                yv += ct[n] * hn;
                dBp[t * N + n] = sum16(gn * dtuv);
                ddtuv += gn * bt[n];
                const v16 q = gn * a * load16(hp + n * W); /* dL/d(log a) */
                store16(dA_acc[n], load16(dA_acc[n]) + q * dtv);
                ddtv += q * load16(a2[n]);
                store16(g[n], gn * a);
            }
            store16(ddtu, ddtuv);
            store16(ddt, ddtv);
            if (z) store16(xdz + row, load16(dz_y) * yv);
#pragma omp simd
            for (int k = 0; k < W; ++k) {
                const float d = (ddt[k] * LN2 + ddtu[k] * uk[k]) * dsp[j * W + k];
                xdu[row + k] = ddtu[k] * dt[k] + dy[k] * D_k[k];
                dD_acc[k] += dy[k] * uk[k];
                xddelta[row + k] = d;
                dbias_acc[k] += d;
            }
        }
        if (tiles) {
            tile_out(xdu, T, du + at, sd);
            tile_out(xddelta, T, ddelta + at, sd);
            if (z) tile_out(xdz, T, dz + at, sd);
        }
    }
    free(scratch);
    for (int64_t n = 0; n < N; ++n)
        for (int k = 0; k < W; ++k) {
            dA_part[(b * N + n) * dim + d0 + k] = dA_acc[n][k];
            if (dh0) dh0[(b * dim + d0 + k) * N + n] = g[n][k];
        }
    for (int k = 0; k < W; ++k) {
        if (dD_part) dD_part[b * dim + d0 + k] = dD_acc[k];
        if (dbias_part) dbias_part[b * dim + d0 + k] = dbias_acc[k];
    }
    return 0;
}

int64_t esh_scan_bwd_f32(const float *u, const float *delta, const float *A2, const float *Bm, const float *Cm,
                         const float *Dv, const float *bias, const float *z, int softplus,
                         const float *dout, const float *dlast, const float *ckpt, int64_t K, float *du,
                         float *ddelta, float *dz, float *dA_part, float *dD_part, float *dbias_part, float *dB_part, float *dC_part,
                         float *dh0, int64_t batch, int64_t L, int64_t dim, int64_t N, int64_t GB, int64_t GC,
                         int seq_major, int nthreads) {
    const int64_t items = batch * (dim / W);
    int64_t failed = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : failed)
    for (int64_t item = 0; item < items; ++item) {
        if (seq_major)
            failed += bwd_item(u, delta, A2, Bm, Cm, Dv, bias, z, softplus, dout, dlast, ckpt, K, du, ddelta, dz,
                               dA_part, dD_part, dbias_part, dB_part, dC_part, dh0, L, dim, N, GB, GC, item, dim, 1);
        else
            failed += bwd_item(u, delta, A2, Bm, Cm, Dv, bias, z, softplus, dout, dlast, ckpt, K, du, ddelta, dz,
                               dA_part, dD_part, dbias_part, dB_part, dC_part, dh0, L, dim, N, GB, GC, item, 1, L);
    }
    return failed;
}

/* out[o, j] = sum_{i < count} part[o, i, j] for part (outer, count, inner), the i in order: a sum
 * whose bits do not depend on the number of threads. */
void esh_scan_reduce_f32(const float *part, float *out, int64_t outer, int64_t count, int64_t inner,
                         int nthreads) {
    const int64_t tile = 4096;
    const int64_t tiles = (inner + tile - 1) / tile;
    /* one item (a dA, dD or bias sum: one row of at most a tile) runs where it is called: a
     * parallel region would only add its start and join */
#pragma omp parallel for schedule(static) num_threads(nthreads) if (outer * tiles > 1)
    for (int64_t item = 0; item < outer * tiles; ++item) {
        const int64_t o = item / tiles;
        const int64_t j0 = (item % tiles) * tile;
        const int64_t j1 = j0 + tile < inner ? j0 + tile : inner;
        float *dst = out + o * inner;
        const float *src = part + o * count * inner;
        for (int64_t j = j0; j < j1; ++j) dst[j] = src[j];
        for (int64_t i = 1; i < count; ++i)
            for (int64_t j = j0; j < j1; ++j) dst[j] += src[i * inner + j];
    }
}
