/* y = x W^T (+ b) for a few rows of x, bf16: the linear layers of a small decode batch.
 *
 * With one to a few tokens a step, a linear layer is a stream over its weights, and what matters is
 * reading them at memory speed; oneDNN's GEMM reaches about half of it there. Here each weight row
 * is read once and dotted with every row of x. x [M, K], W [N, K], b [N] (or NULL), y [M, N]: all
 * bf16 and contiguous, M <= GEMV_MAX_ROWS. Accumulation is in float32; rows of W are shared out
 * over OpenMP threads. With AVX512-BF16 the dot products use vdpbf16ps (32 products an
 * instruction), with AVX2 widening loads and FMAs (8 an instruction), elsewhere portable code
 * that the compiler vectorises.
 */
#include "common.h"

#define GEMV_MAX_ROWS 4 /* from about 8 rows on, oneDNN's packed GEMM is faster */

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

static inline void dot_rows(const bf16 *x, const bf16 *w_row, int m_rows, int k, float *sums) {
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
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline __m256 load8_bf16(const bf16 *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Two accumulators a row, so consecutive FMAs do not wait on each other. */
static inline void dot_rows(const bf16 *x, const bf16 *w_row, int m_rows, int k, float *sums) {
    __m256 acc0[GEMV_MAX_ROWS], acc1[GEMV_MAX_ROWS];
    for (int m = 0; m < m_rows; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= k; i += 16) {
        const __m256 w0 = load8_bf16(w_row + i), w1 = load8_bf16(w_row + i + 8);
        for (int m = 0; m < m_rows; m++) {
            acc0[m] = _mm256_fmadd_ps(load8_bf16(x + (int64_t)m * k + i), w0, acc0[m]);
            acc1[m] = _mm256_fmadd_ps(load8_bf16(x + (int64_t)m * k + i + 8), w1, acc1[m]);
        }
    }
    for (int m = 0; m < m_rows; m++) {
        const __m256 v = _mm256_add_ps(acc0[m], acc1[m]);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        float s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
        for (int j = i; j < k; j++) s += load(x, (int64_t)m * k + j, 1) * load(w_row, j, 1);
        sums[m] = s;
    }
}
#else
static inline void dot_rows(const bf16 *x, const bf16 *w_row, int m_rows, int k, float *sums) {
    for (int m = 0; m < m_rows; m++) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < k; j++) s += load(x, (int64_t)m * k + j, 1) * load(w_row, j, 1);
        sums[m] = s;
    }
}
#endif

int gemv_bf16(const bf16 *x, const bf16 *w, const bf16 *bias, bf16 *y, int m_rows, int n, int k, int num_threads) {
    if (m_rows > GEMV_MAX_ROWS) return -1;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int row = 0; row < n; row++) {
        float sums[GEMV_MAX_ROWS];
        dot_rows(x, w + (int64_t)row * k, m_rows, k, sums);
        const float b = bias ? load(bias, row, 1) : 0.0f;
        for (int m = 0; m < m_rows; m++) store(y, (int64_t)m * n + row, sums[m] + b, 1);
    }
    return 0;
}

int gemv_max_rows(void) { return GEMV_MAX_ROWS; }
