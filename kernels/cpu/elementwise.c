/* The model's element-wise ops on the CPU, each one pass over memory instead of torch's several:
 * RMSNorm (alone and fused with the residual add), SiLU-and-mul, neox rotary embedding; and the
 * argmax of each row of the logits.
 *
 * Rounding follows the torch ops they replace (transformers' order): for bf16, RMSNorm rounds the
 * normalised row before scaling by the weight, and SiLU rounds before the multiply. Math is float32.
 * Rows are shared out over OpenMP threads when there are enough of them.
 */
#include <math.h>

#include "common.h"

/* Each op is written for one row; the entry points at the end run rows on OpenMP threads, with
 * the dtype a literal in each so the compiler specialises and vectorises the row per dtype. */

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 load16_bf16(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 round16_bf16(__m512 x) { /* to the nearest bf16 (even on ties), as store() */
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

/* the first `count` (< 16) lanes; the others read as 0 */
static inline __m512 load_tail_bf16(const bf16 *p, int count) {
    const __m256i raw = _mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

static inline void store16_bf16(bf16 *p, __m512 x) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(x)); }

static inline void store_tail_bf16(bf16 *p, __m512 x, int count) {
    _mm256_mask_storeu_epi16(p, (__mmask16)((1u << count) - 1), (__m256i)_mm512_cvtneps_pbh(x));
}

/* bf16 RMSNorm rows, 16 lanes at a time with the same roundings as rms_norm_row; `residual` (when
 * not NULL) is added to x first and receives the sum, and the result goes to out. */
static inline void rms_norm_row_bf16(const bf16 *x, bf16 *residual, const bf16 *weight, bf16 *out, int dim,
                                     float eps) {
    __m512 sum = _mm512_setzero_ps();
    int d = 0;
    for (; d + 16 <= dim; d += 16) {
        __m512 v = load16_bf16(x + d);
        if (residual) {
            v = round16_bf16(_mm512_add_ps(v, load16_bf16(residual + d)));
            store16_bf16(residual + d, v);
        }
        sum = _mm512_fmadd_ps(v, v, sum);
    }
    if (d < dim) {
        __m512 v = load_tail_bf16(x + d, dim - d);
        if (residual) {
            v = round16_bf16(_mm512_add_ps(v, load_tail_bf16(residual + d, dim - d)));
            store_tail_bf16(residual + d, v, dim - d);
        }
        sum = _mm512_fmadd_ps(v, v, sum);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sum) / dim + eps));
    const bf16 *normed = residual ? residual : x;
    for (d = 0; d + 16 <= dim; d += 16)
        store16_bf16(out + d, _mm512_mul_ps(round16_bf16(_mm512_mul_ps(load16_bf16(normed + d), inv)),
                                            load16_bf16(weight + d)));
    if (d < dim)
        store_tail_bf16(out + d, _mm512_mul_ps(round16_bf16(_mm512_mul_ps(load_tail_bf16(normed + d, dim - d), inv)),
                                               load_tail_bf16(weight + d, dim - d)), dim - d);
}

/* bf16 SiLU-and-mul, 16 lanes at a time: 1 / (1 + e^-g) by vrcp14ps and one Newton step (a
 * relative error near 1e-7, as the division's) instead of a division, which is the loop's cost. */
static inline void silu_and_mul_row_bf16(const bf16 *x, bf16 *out, int64_t r, int dim) {
    const bf16 *gate = x + r * 2 * dim, *up = gate + dim;
    bf16 *o = out + r * dim;
    int d = 0;
    for (; d + 16 <= dim; d += 16) {
        const __m512 g = load16_bf16(gate + d);
        const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
        __m512 inv = _mm512_rcp14_ps(den);
        inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(den, inv, _mm512_set1_ps(2.0f)));
        const __m512 silu = round16_bf16(_mm512_mul_ps(g, inv));
        store16_bf16(o + d, _mm512_mul_ps(silu, load16_bf16(up + d)));
    }
    for (; d < dim; d++) {
        const float g = load(gate, d, 1);
        store(o, d, round_as(g / (1.0f + exp_approx(-g)), 1) * load(up, d, 1), 1);
    }
}
#endif

/* out[r] = weight * round(x[r] / rms(x[r])); x rows `x_stride` elements apart, out contiguous. */
static inline void rms_norm_row(const void *x, int64_t x_stride, const void *weight, void *out, int64_t r,
                                int dim, float eps, int is_bf16) {
    const int64_t in = r * x_stride, o = r * dim;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (is_bf16) {
        rms_norm_row_bf16((const bf16 *)x + in, NULL, weight, (bf16 *)out + o, dim, eps);
        return;
    }
#endif
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int d = 0; d < dim; d++) {
        const float v = load(x, in + d, is_bf16);
        sum += v * v;
    }
    const float inv = 1.0f / sqrtf(sum / dim + eps);
    for (int d = 0; d < dim; d++)
        store(out, o + d, round_as(load(x, in + d, is_bf16) * inv, is_bf16) * load(weight, d, is_bf16), is_bf16);
}

/* residual[r] += x[r]; x[r] = rms_norm(residual[r]): both contiguous, updated in place. */
static inline void fused_add_rms_norm_row(void *x, void *residual, const void *weight, int64_t r, int dim,
                                          float eps, int is_bf16) {
    const int64_t o = r * dim;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (is_bf16) {
        rms_norm_row_bf16((bf16 *)x + o, (bf16 *)residual + o, weight, (bf16 *)x + o, dim, eps);
        return;
    }
#endif
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int d = 0; d < dim; d++) {
        const float v = round_as(load(x, o + d, is_bf16) + load(residual, o + d, is_bf16), is_bf16);
        store(residual, o + d, v, is_bf16);
        sum += v * v;
    }
    const float inv = 1.0f / sqrtf(sum / dim + eps);
    for (int d = 0; d < dim; d++)
        store(x, o + d, round_as(load(residual, o + d, is_bf16) * inv, is_bf16) * load(weight, d, is_bf16), is_bf16);
}

/* out[r] = silu(x[r, :dim]) * x[r, dim:]; x [rows, 2*dim] and out [rows, dim] contiguous. */
static inline void silu_and_mul_row(const void *x, void *out, int64_t r, int dim, int is_bf16) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (is_bf16) {
        silu_and_mul_row_bf16(x, out, r, dim);
        return;
    }
#endif
    const int64_t gate = r * 2 * dim, up = gate + dim, o = r * dim;
    for (int64_t d = 0; d < dim; d++) {
        const float g = load(x, gate + d, is_bf16);
        const float silu = round_as(g / (1.0f + exp_approx(-g)), is_bf16);
        store(out, o + d, silu * load(x, up + d, is_bf16), is_bf16);
    }
}

/* Neox-style rotation, in place, of the first rot_dim dims of each head of token t of q and k:
 * x1, x2 = halves; x1' = x1 cos - x2 sin; x2' = x2 cos + x1 sin. Heads are head_dim apart within a
 * token, tokens q_stride (k_stride) apart. cos_sin_cache [max_position, rot_dim] float32. */
static inline void rotary_neox_token(const int64_t *positions, void *q, int64_t q_stride, int num_q_heads,
                                     void *k, int64_t k_stride, int num_k_heads, int head_dim, int rot_dim,
                                     const float *cos_sin_cache, int64_t t, int is_bf16) {
    const int half = rot_dim / 2;
    const float *cos = cos_sin_cache + positions[t] * rot_dim, *sin = cos + half;
    for (int h = 0; h < num_q_heads + num_k_heads; h++) {
        void *base = h < num_q_heads ? q : k;
        const int64_t start = h < num_q_heads ? t * q_stride + (int64_t)h * head_dim
                                              : t * k_stride + (int64_t)(h - num_q_heads) * head_dim;
        for (int d = 0; d < half; d++) {
            const float x1 = load(base, start + d, is_bf16), x2 = load(base, start + half + d, is_bf16);
            store(base, start + d, x1 * cos[d] - x2 * sin[d], is_bf16);
            store(base, start + half + d, x2 * cos[d] + x1 * sin[d], is_bf16);
        }
    }
}

/* Needs `rows` and `num_threads` in scope (a pragma cannot take macro arguments). */
#define FOR_EACH_ROW(r) \
    _Pragma("omp parallel for num_threads(threads_for(rows, num_threads))") for (int64_t r = 0; r < rows; r++)

#define ENTRY_POINTS(SUFFIX, IS_BF16)                                                                          \
    void rms_norm_##SUFFIX(const void *x, int64_t x_stride, const void *weight, void *out, int64_t rows,     \
                           int dim, float eps, int num_threads) {                                             \
        FOR_EACH_ROW(r) rms_norm_row(x, x_stride, weight, out, r, dim, eps, IS_BF16);                  \
    }                                                                                                          \
    void fused_add_rms_norm_##SUFFIX(void *x, void *residual, const void *weight, int64_t rows, int dim,     \
                                     float eps, int num_threads) {                                            \
        FOR_EACH_ROW(r) fused_add_rms_norm_row(x, residual, weight, r, dim, eps, IS_BF16);             \
    }                                                                                                          \
    void silu_and_mul_##SUFFIX(const void *x, void *out, int64_t rows, int dim, int num_threads) {           \
        FOR_EACH_ROW(r) silu_and_mul_row(x, out, r, dim, IS_BF16);                                     \
    }                                                                                                          \
    void rotary_neox_##SUFFIX(const int64_t *positions, void *q, int64_t q_stride, int num_q_heads, void *k, \
                              int64_t k_stride, int num_k_heads, int head_dim, int rot_dim,                  \
                              const float *cos_sin_cache, int64_t rows, int num_threads) {                    \
        FOR_EACH_ROW(t)                                                                                        \
        rotary_neox_token(positions, q, q_stride, num_q_heads, k, k_stride, num_k_heads, head_dim, rot_dim,  \
                          cos_sin_cache, t, IS_BF16);                                                          \
    }

#define ARGMAX_CHUNK 256

/* out[r] = the first index of the largest value of row r of x [rows, cols] float32 (rows free of
 * NaN), as torch.argmax: the maximum of each chunk in a vectorised pass, the row's first chunk
 * holding the largest kept, then that chunk scanned for it. */
void argmax_rows_f32(const float *x, int64_t rows, int64_t cols, int64_t *out, int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows * cols / 4096, num_threads))
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * cols;
        float top = -INFINITY;
        int64_t best = 0;
        for (int64_t start = 0; start < cols; start += ARGMAX_CHUNK) {
            const int64_t end = start + ARGMAX_CHUNK < cols ? start + ARGMAX_CHUNK : cols;
            float chunk_top = -INFINITY;
#pragma omp simd reduction(max : chunk_top)
            for (int64_t i = start; i < end; i++) chunk_top = row[i] > chunk_top ? row[i] : chunk_top;
            if (chunk_top > top) {
                top = chunk_top;
                best = start;
            }
        }
        while (best < cols - 1 && row[best] != top) best++;
        out[r] = best;
    }
}

ENTRY_POINTS(f32, 0)
ENTRY_POINTS(bf16, 1)
