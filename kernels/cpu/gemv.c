/* y = x W^T (+ b) for a few rows of x, with W in bf16: the linear layers of a small decode batch.
 *
 * With one to a few tokens a step, a linear layer is a stream over its weights, and what matters is
 * reading them at memory speed; oneDNN's GEMM reaches about half of it there. Here each weight row
 * is read once and dotted with every row of x. x [M, K], W [N, K], b [N] (or NULL), y [M, N], all
 * contiguous, M <= GEMV_MAX_ROWS; x, b and y are bf16 (gemv_bf16) or float32 (gemv_f32_bf16w, for
 * a float32 model that keeps its bf16 weights for this: half the bytes of float32 ones to read).
 * Accumulation is in float32; rows of W are shared out over OpenMP threads. With AVX512-BF16 the
 * bf16 dot products use vdpbf16ps (32 products an instruction), with AVX-512 or AVX2 widening
 * loads and FMAs (16 or 8), elsewhere portable code that the compiler vectorises.
 */
#include "common.h"

#define GEMV_MAX_ROWS 4 /* from about 8 rows on, oneDNN's packed GEMM is faster */

#if defined(__AVX512BF16__) && defined(__AVX512F__)
static inline void dot_rows_dpbf16(const bf16 *x, const bf16 *w_row, int m_rows, int k, float *sums) {
    __m512 acc[GEMV_MAX_ROWS];
    for (int m = 0; m < m_rows; m++) acc[m] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= k; i += 32) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512(w_row + i);
        for (int m = 0; m < m_rows; m++)
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + (int64_t)m * k + i), w);
    }
    for (int m = 0; m < m_rows; m++) {
        float s = _mm512_reduce_add_ps(acc[m]);
        for (int j = i; j < k; j++) s += load(x, (int64_t)m * k + j, 1) * load(w_row, j, 1);
        sums[m] = s;
    }
}
#endif

/* sums[m] = x[m] . w_row for m < m_rows, x of the dtype X_BF16 says (a literal in each caller). */
static inline __attribute__((always_inline)) void dot_rows(const void *x, const bf16 *w_row, int m_rows, int k,
                                                           float *sums, const int x_bf16) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (x_bf16) {
        dot_rows_dpbf16(x, w_row, m_rows, k, sums);
        return;
    }
#endif
    int i = 0;
#if defined(VLEN)
    /* Two accumulators a row, so consecutive FMAs do not wait on each other. */
    vfloat acc0[GEMV_MAX_ROWS], acc1[GEMV_MAX_ROWS];
    for (int m = 0; m < m_rows; m++) acc0[m] = acc1[m] = vzero();
    for (; i + 2 * VLEN <= k; i += 2 * VLEN) {
        const vfloat w0 = vload_bf16(w_row + i), w1 = vload_bf16(w_row + i + VLEN);
        for (int m = 0; m < m_rows; m++) {
            acc0[m] = vfmadd(vload(x, (int64_t)m * k + i, x_bf16), w0, acc0[m]);
            acc1[m] = vfmadd(vload(x, (int64_t)m * k + i + VLEN, x_bf16), w1, acc1[m]);
        }
    }
#endif
    for (int m = 0; m < m_rows; m++) {
        float s = 0.0f;
#if defined(VLEN)
        s = vreduce_add(vadd(acc0[m], acc1[m]));
#endif
#pragma omp simd reduction(+ : s)
        for (int j = i; j < k; j++) s += load(x, (int64_t)m * k + j, x_bf16) * load(w_row, j, 1);
        sums[m] = s;
    }
}

static inline __attribute__((always_inline)) int gemv(const void *x, const bf16 *w, const void *bias, void *y,
                                                      int m_rows, int n, int k, int num_threads, const int x_bf16) {
    if (m_rows > GEMV_MAX_ROWS) return -1;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int row = 0; row < n; row++) {
        float sums[GEMV_MAX_ROWS];
        dot_rows(x, w + (int64_t)row * k, m_rows, k, sums, x_bf16);
        const float b = bias ? load(bias, row, x_bf16) : 0.0f;
        for (int m = 0; m < m_rows; m++) store(y, (int64_t)m * n + row, sums[m] + b, x_bf16);
    }
    return 0;
}

int gemv_bf16(const bf16 *x, const bf16 *w, const bf16 *bias, bf16 *y, int m_rows, int n, int k, int num_threads) {
    return gemv(x, w, bias, y, m_rows, n, k, num_threads, 1);
}

int gemv_f32_bf16w(const float *x, const bf16 *w, const float *bias, float *y, int m_rows, int n, int k,
                   int num_threads) {
    return gemv(x, w, bias, y, m_rows, n, k, num_threads, 0);
}

int gemv_max_rows(void) { return GEMV_MAX_ROWS; }
