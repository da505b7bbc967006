/* The backward of a linear map from a few features to many on the CPU: the Mamba mixers'
 * dt_proj, which lifts each token's dt_rank (4-16) step features to every channel. MKL runs its
 * backward's shapes (8 outputs; 8 columns summed over every token) far below its speed
 * elsewhere; here one memory-bound pass over the gradient gives both products. The forward
 * (out = x wt) stays MKL's. Built into the same library as scan_cpu.c (cpu_kernel.py).
 *
 *   dx[m, r]  = sum_n g[m, n] wt[r, n]          x (M, R) rows xs apart, wt (R, N) contiguous,
 *                                               g (M, N) rows gs apart, dx (M, R) contiguous
 *   dw[r, n]  = sum_m x[m, r] g[m, n]           as per-item partials (one item: ESH_LOWRANK_ROWS
 *                                               rows) that the caller adds in a fixed order:
 *                                               the same bits for any number of threads
 */
#include <stdint.h>

#define ESH_LOWRANK_ROWS 64  /* rows per item of the backward's partial sums */

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
