/* The Mamba mixers' depthwise 1-d convolution on the CPU, forward and backward, fused with the
 * SiLU that follows it: one pass over the sequence-major activations (batch, L, channels) each
 * way, where the PyTorch form takes K shifted multiply-adds (and the SiLU) over the whole
 * tensor. Built into the same library as scan_cpu.c (cpu_kernel.py).
 *
 *   pre[b, t, d] = bias[d] + sum_k w[k, d] x[b, t + k - left, d]   (zero outside 0 <= t < L)
 *   out[b, t, d] = silu(pre) if silu else pre
 *
 * w is the (K, dim) transpose of a Conv1d's (dim, 1, K) weight; left = K - 1 is causal. x and
 * out take a batch and a step stride (the channels contiguous), so x can be a view of a wider
 * projection and out a slice of a wider tensor. The backward's sums over the batch and the
 * steps (dw, dbias) are per-item partials (one item: ESH_CONV_STEPS steps of one sequence) that
 * the caller adds in a fixed order: the same bits for any number of threads.
 */
#include <math.h>
#include <stdint.h>

#include "esh_math.h"

#define ESH_CONV_CHANNELS 64 /* channels per inner loop: the accumulators stay in registers */
#define ESH_CONV_STEPS 64    /* steps per item of the backward's partial sums */

/* One step of one sequence, channels d0 .. d1 - 1, into dst (the pre-activation, or the output). */
static inline void conv_row(const float *xb, int64_t xst, const float *w, const float *bias, int64_t t, int64_t L,
                            int64_t dim, int64_t K, int64_t left, int silu, float *dst) {
    for (int64_t d0 = 0; d0 < dim; d0 += ESH_CONV_CHANNELS) {
        const int64_t n = dim - d0 < ESH_CONV_CHANNELS ? dim - d0 : ESH_CONV_CHANNELS;
        float acc[ESH_CONV_CHANNELS];
        for (int64_t i = 0; i < n; ++i) acc[i] = bias ? bias[d0 + i] : 0.0f;
        for (int64_t j = 0; j < K; ++j) { /* the tap at offset 0, the past ones outwards, then the future */
            const int64_t k = j <= left ? left - j : j;
            const int64_t s = t + k - left;
            if (s < 0 || s >= L) continue;
            const float *xs = xb + s * xst + d0, *wk = w + k * dim + d0;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) acc[i] += wk[i] * xs[i];
        }
        if (silu) {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) dst[d0 + i] = acc[i] * esh_sigmoidf(acc[i]);
        } else {
            for (int64_t i = 0; i < n; ++i) dst[d0 + i] = acc[i];
        }
    }
}

void esh_dwconv_fwd_f32(const float *x, int64_t xsb, int64_t xst, const float *w, const float *bias, float *out,
                        int64_t osb, int64_t ost, int64_t batch, int64_t L, int64_t dim, int64_t K, int64_t left,
                        int silu, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t row = 0; row < batch * L; ++row) {
        const int64_t b = row / L, t = row % L;
        conv_row(x + b * xsb, xst, w, bias, t, L, dim, K, left, silu, out + b * osb + t * ost);
    }
}

/* The number of items of the backward's partial sums (see esh_dwconv_bwd_f32). */
int64_t esh_dwconv_items(int64_t batch, int64_t L) { return batch * ((L + ESH_CONV_STEPS - 1) / ESH_CONV_STEPS); }

/* Gradients of sum(out * g), g (batch, L, dim) contiguous. gpre (batch, L, dim): with silu,
 * scratch for the gradient before the SiLU (the pre-activation is recomputed from x); NULL
 * without (g is that gradient). Written: dx (batch, L, dim) contiguous or NULL, dw_part
 * (items, K, dim) and db_part (items, dim) or NULL, items = esh_dwconv_items(batch, L). */
void esh_dwconv_bwd_f32(const float *x, int64_t xsb, int64_t xst, const float *w, const float *bias, const float *g,
                        float *gpre, float *dx, float *dw_part, float *db_part, int64_t batch, int64_t L, int64_t dim,
                        int64_t K, int64_t left, int silu, int nthreads) {
    if (silu) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t row = 0; row < batch * L; ++row) {
            const int64_t b = row / L, t = row % L;
            float *gp = gpre + row * dim;
            conv_row(x + b * xsb, xst, w, bias, t, L, dim, K, left, 0, gp); /* pre, overwritten below */
            const float *gr = g + row * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) {
                const float p = gp[d], s = esh_sigmoidf(p);
                gp[d] = gr[d] * s * (1.0f + p * (1.0f - s));
            }
        }
    }
    const float *gp = silu ? gpre : g;
    const int64_t per = (L + ESH_CONV_STEPS - 1) / ESH_CONV_STEPS;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t item = 0; item < batch * per; ++item) {
        const int64_t b = item / per;
        const int64_t t0 = (item % per) * ESH_CONV_STEPS;
        const int64_t t1 = t0 + ESH_CONV_STEPS < L ? t0 + ESH_CONV_STEPS : L;
        const float *xb = x + b * xsb, *gb = gp + b * L * dim;
        float *dwp = dw_part + item * K * dim, *dbp = db_part ? db_part + item * dim : 0;
        for (int64_t i = 0; i < K * dim; ++i) dwp[i] = 0.0f;
        if (dbp)
            for (int64_t d = 0; d < dim; ++d) dbp[d] = 0.0f;
        for (int64_t t = t0; t < t1; ++t) {
            const float *gt = gb + t * dim;
            if (dx) { /* the transposed convolution: dx[t] = sum_k w[k] gp[t - k + left] */
                float *dxt = dx + (b * L + t) * dim;
                for (int64_t d = 0; d < dim; ++d) dxt[d] = 0.0f;
                for (int64_t k = 0; k < K; ++k) {
                    const int64_t s = t - k + left;
                    if (s < 0 || s >= L) continue;
                    const float *gs = gb + s * dim, *wk = w + k * dim;
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) dxt[d] += wk[d] * gs[d];
                }
            }
            for (int64_t k = 0; k < K; ++k) { /* dw[k] += gp[t] x[t + k - left] */
                const int64_t s = t + k - left;
                if (s < 0 || s >= L) continue;
                const float *xs = xb + s * xst;
                float *dwk = dwp + k * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) dwk[d] += gt[d] * xs[d];
            }
            if (dbp) {
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) dbp[d] += gt[d];
            }
        }
    }
}
