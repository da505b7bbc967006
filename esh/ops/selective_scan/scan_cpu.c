/* The selective scan's forward pass on the CPU, fused: one pass over the sequence per block of
 * 16 channels, the state (N x 16 floats) kept in registers and L1, nothing of size L x N ever
 * written to memory. Built on first use by esh/ops/selective_scan/cpu_kernel.py with the
 * system C compiler (-O3 -march=native -ffast-math -fopenmp); the decays' exponentials are
 * inlined (esh_exp2f) and vectorise with the rest. Inference only: training uses the chunked
 * PyTorch scan.
 *
 *   dt[t]   = softplus(delta[t] + bias)             (or delta[t] + bias)
 *   h[t, n] = exp2(dt[t] * A2[n]) * h[t-1, n] + dt[t] * u[t] * B[t, n]
 *   y[t]    = sum_n C[t, n] * h[t, n] + D * u[t]
 *
 * with A2 = A * log2(e). Layouts (all contiguous, float32):
 *   u, delta, y      (batch, L, dim)      sequence-major, as the mixers produce them
 *   A2               (N, dim)
 *   Bm, Cm           (batch, L, G, N)     one B and C per group of dim / G channels
 *   Dv, bias         (dim) or NULL
 *   h_last           (batch, dim, N) or NULL: the final state
 *   h_init           (batch, dim, N) or NULL: the state before the first step (else zero), so
 *                    that a long sequence can be scanned piece by piece
 * dim / G must be a multiple of W and N at most ESH_MAX_N (cpu_kernel.py's BLOCK and MAX_STATES,
 * which the Python side checks).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define W 16
#define ESH_MAX_N 64

/* 2^x for the decays, inlined so that the state loop vectorises without a library call:
 * 2^x = 2^i * 2^f with i = round(x), |f| <= 1/2, and 2^f = e^(f ln 2) by its Taylor series to
 * degree 7 (truncation error below 6e-9 relative, under float32's rounding). x is clamped to
 * [-126, 126]: decays below 2^-126 come out as 2^-126, which no float32 sum can tell from 0. */
static inline float esh_exp2f(float x) {
    x = fminf(fmaxf(x, -126.0f), 126.0f);
    const float r = floorf(x + 0.5f);
    const float f = (x - r) * 0.6931471805599453f;
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    union {
        int32_t i;
        float f;
    } scale;
    scale.i = ((int32_t)r + 127) << 23;
    return p * scale.f;
}

void esh_scan_fwd_f32(const float *u, const float *delta, const float *A2, const float *Bm, const float *Cm,
                      const float *Dv, const float *bias, int softplus, float *y, float *h_last,
                      const float *h_init, int64_t batch, int64_t L, int64_t dim, int64_t N, int64_t G,
                      int nthreads) {
    const int64_t dg = dim / G;
    const int64_t blocks = dim / W;
    const int64_t items = batch * blocks;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t b = item / blocks;
        const int64_t d0 = (item % blocks) * W;
        const int64_t g = d0 / dg;
        float h[ESH_MAX_N][W];
        float a2[ESH_MAX_N][W];
        float bias_k[W], D_k[W];
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
            const int64_t row = (b * L + t) * dim + d0;
            const float *bt = Bm + ((b * L + t) * G + g) * N;
            const float *ct = Cm + ((b * L + t) * G + g) * N;
            float dt[W], dtu[W], acc[W];
#pragma omp simd
            for (int k = 0; k < W; ++k) {
                float x = delta[row + k] + bias_k[k];
                if (softplus) x = x > 20.0f ? x : log1pf(expf(fminf(x, 20.0f)));
                dt[k] = x;
                dtu[k] = x * u[row + k];
                acc[k] = D_k[k] * u[row + k];
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
            for (int k = 0; k < W; ++k) y[row + k] = acc[k];
        }
        if (h_last)
            for (int k = 0; k < W; ++k)
                for (int64_t n = 0; n < N; ++n) h_last[(b * dim + d0 + k) * N + n] = h[n][k];
    }
}
