/* A linear map from a few features to many on the CPU, forward and backward: the Mamba mixers'
 * dt_proj, which lifts each token's dt_rank (4-16) step features to every channel. MKL's GEMM
 * runs these shapes (inner dimension of 8, or 8 outputs in the backward) far below its speed
 * elsewhere; the loops here are memory-bound passes, the backward one pass over the gradient
 * for both of its products. Built into the same library as scan_cpu.c (cpu_kernel.py).
 *
 *   out[m, n] = sum_r x[m, r] wt[r, n]          x (M, R) rows xs apart, wt (R, N) contiguous
 *   dx[m, r]  = sum_n g[m, n] wt[r, n]          g (M, N) rows gs apart, dx (M, R) contiguous
 *   dw[r, n]  = sum_m x[m, r] g[m, n]           as per-item partials (one item: ESH_LOWRANK_ROWS
 *                                               rows) that the caller adds in a fixed order:
 *                                               the same bits for any number of threads
 */
#include <stdint.h>

#define ESH_LOWRANK_COLS 64  /* outputs per inner loop: the accumulators stay in registers */
#define ESH_LOWRANK_ROWS 64  /* rows per item of the backward's partial sums */

/* out[m, n0 .. n0 + c) for c <= ESH_LOWRANK_COLS; a constant c keeps the accumulators in registers */
static inline void fwd_cols(const float *xm, const float *wt, float *om, int64_t N, int64_t R, int64_t n0, int64_t c) {
    float acc[ESH_LOWRANK_COLS];
    for (int64_t i = 0; i < c; ++i) acc[i] = 0.0f;
    for (int64_t r = 0; r < R; ++r) {
        const float xv = xm[r], *wr = wt + r * N + n0;
#pragma omp simd
        for (int64_t i = 0; i < c; ++i) acc[i] += xv * wr[i];
    }
    for (int64_t i = 0; i < c; ++i) om[n0 + i] = acc[i];
}

void esh_lowrank_fwd_f32(const float *x, int64_t xs, const float *wt, float *out, int64_t os, int64_t M, int64_t N,
                         int64_t R, int nthreads) {
    const int64_t full = N / ESH_LOWRANK_COLS * ESH_LOWRANK_COLS;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t m = 0; m < M; ++m) {
        const float *xm = x + m * xs;
        float *om = out + m * os;
        for (int64_t n0 = 0; n0 < full; n0 += ESH_LOWRANK_COLS) fwd_cols(xm, wt, om, N, R, n0, ESH_LOWRANK_COLS);
        if (full < N) fwd_cols(xm, wt, om, N, R, full, N - full);
    }
}

/* The number of items of the backward's partial sums. */
int64_t esh_lowrank_items(int64_t M) { return (M + ESH_LOWRANK_ROWS - 1) / ESH_LOWRANK_ROWS; }

/* dx (or NULL) and dw_part (items, R, N) (or NULL), items = esh_lowrank_items(M). */
void esh_lowrank_bwd_f32(const float *x, int64_t xs, const float *wt, const float *g, int64_t gs, float *dx,
                         float *dw_part, int64_t M, int64_t N, int64_t R, int nthreads) {
    const int64_t items = esh_lowrank_items(M);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t m0 = item * ESH_LOWRANK_ROWS;
        const int64_t m1 = m0 + ESH_LOWRANK_ROWS < M ? m0 + ESH_LOWRANK_ROWS : M;
        float *dwp = dw_part ? dw_part + item * R * N : 0;
        if (dwp)
            for (int64_t i = 0; i < R * N; ++i) dwp[i] = 0.0f;
        for (int64_t m = m0; m < m1; ++m) {
            const float *gm = g + m * gs, *xm = x + m * xs;
            for (int64_t r = 0; r < R; ++r) {
                const float *wr = wt + r * N;
                if (dx) {
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int64_t n = 0; n < N; ++n) s += gm[n] * wr[n];
                    dx[m * R + r] = s;
                }
                if (dwp) {
                    const float xv = xm[r];
                    float *dr = dwp + r * N;
#pragma omp simd
                    for (int64_t n = 0; n < N; ++n) dr[n] += xv * gm[n];
                }
            }
        }
    }
}
