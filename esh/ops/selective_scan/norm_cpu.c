/* RMSNorm over the last dimension on the CPU, forward and backward, one pass over each row
 * (PyTorch's CPU form takes a pow, a mean, an rsqrt and two products forward and about ten
 * ops backward). Built into the same library as scan_cpu.c (cpu_kernel.py).
 *
 *   rstd[r] = 1 / sqrt(mean_d x[r, d]^2 + eps)
 *   y[r, d] = x[r, d] rstd[r] w[d]                      (w = NULL: no weight)
 *
 * x, y, g, dx are (rows, dim) contiguous. The backward's sum over the rows (dw) is written as
 * per-item partials (one item: ESH_NORM_ROWS rows) that the caller adds in a fixed order: the
 * same bits for any number of threads.
 */
#include <math.h>
#include <stdint.h>

#define ESH_NORM_ROWS 64 /* rows per item of the backward's partial sums */

void esh_rmsnorm_fwd_f32(const float *x, const float *w, float *y, float *rstd, int64_t rows, int64_t dim,
                         float eps, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t d = 0; d < dim; ++d) ss += xr[d] * xr[d];
        const float s = 1.0f / sqrtf(ss / (float)dim + eps);
        rstd[r] = s;
        if (w) {
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) yr[d] = xr[d] * s * w[d];
        } else {
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) yr[d] = xr[d] * s;
        }
    }
}

/* The number of items of the backward's partial sums. */
int64_t esh_rmsnorm_items(int64_t rows) { return (rows + ESH_NORM_ROWS - 1) / ESH_NORM_ROWS; }

/* Gradients of sum(y * g): dx (rows, dim) and, with w, dw_part (items, dim). */
void esh_rmsnorm_bwd_f32(const float *x, const float *w, const float *rstd, const float *g, float *dx,
                         float *dw_part, int64_t rows, int64_t dim, int nthreads) {
    const int64_t items = esh_rmsnorm_items(rows);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t r0 = item * ESH_NORM_ROWS;
        const int64_t r1 = r0 + ESH_NORM_ROWS < rows ? r0 + ESH_NORM_ROWS : rows;
        float *dwp = w ? dw_part + item * dim : 0;
        if (dwp)
            for (int64_t d = 0; d < dim; ++d) dwp[d] = 0.0f;
        for (int64_t r = r0; r < r1; ++r) {
            const float *xr = x + r * dim, *gr = g + r * dim;
            float *dxr = dx + r * dim;
            const float s = rstd[r];
            float dot = 0.0f; /* sum_d g w x */
            if (w) {
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < dim; ++d) dot += gr[d] * w[d] * xr[d];
            } else {
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < dim; ++d) dot += gr[d] * xr[d];
            }
            const float c = dot * s * s / (float)dim;
            if (w) {
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) {
                    dxr[d] = s * (gr[d] * w[d] - xr[d] * c);
                    dwp[d] += gr[d] * xr[d] * s;
                }
            } else {
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) dxr[d] = s * (gr[d] - xr[d] * c);
            }
        }
    }
}
