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

#if defined(VLEN)
/* Vector rows, VLEN lanes at a time (common.h) for both dtypes, with the same roundings as the
 * scalar rows below; the last dim % VLEN elements go one at a time. */

/* RMSNorm of one row; `residual` (when not NULL) is added to x first and receives the sum, and
 * the result goes to out. */
static inline __attribute__((always_inline)) void rms_norm_row_vec(const void *x, void *residual, const void *weight,
                                                                   void *out, int dim, float eps, const int is_bf16) {
    vfloat sum = vzero();
    float tail = 0.0f;
    int d = 0;
    for (; d + VLEN <= dim; d += VLEN) {
        vfloat v = vload(x, d, is_bf16);
        if (residual) {
            v = vadd(v, vload(residual, d, is_bf16));
            if (is_bf16) v = vround_bf16(v);
            vstore(residual, d, v, is_bf16);
        }
        sum = vfmadd(v, v, sum);
    }
    for (; d < dim; d++) {
        float v = load(x, d, is_bf16);
        if (residual) {
            v = round_as(v + load(residual, d, is_bf16), is_bf16);
            store(residual, d, v, is_bf16);
        }
        tail += v * v;
    }
    const float inv = 1.0f / sqrtf((vreduce_add(sum) + tail) / dim + eps);
    const void *normed = residual ? residual : x;
    for (d = 0; d + VLEN <= dim; d += VLEN) {
        vfloat v = vmul(vload(normed, d, is_bf16), vset1(inv));
        if (is_bf16) v = vround_bf16(v);
        vstore(out, d, vmul(v, vload(weight, d, is_bf16)), is_bf16);
    }
    for (; d < dim; d++)
        store(out, d, round_as(load(normed, d, is_bf16) * inv, is_bf16) * load(weight, d, is_bf16), is_bf16);
}

/* SiLU-and-mul of one row: gate and up dim elements each, out dim. */
static inline __attribute__((always_inline)) void silu_and_mul_row_vec(const void *gate, const void *up, void *out,
                                                                       int dim, const int is_bf16) {
    int d = 0;
    for (; d + VLEN <= dim; d += VLEN) {
        const vfloat g = vload(gate, d, is_bf16);
        vfloat silu = vdiv(g, vadd(vset1(1.0f), vexp(vsub(vzero(), g))));
        if (is_bf16) silu = vround_bf16(silu);
        vstore(out, d, vmul(silu, vload(up, d, is_bf16)), is_bf16);
    }
    for (; d < dim; d++) {
        const float g = load(gate, d, is_bf16);
        store(out, d, round_as(g / (1.0f + exp_approx(-g)), is_bf16) * load(up, d, is_bf16), is_bf16);
    }
}

/* Neox rotation of one head's first 2 * half dims by cos and sin. */
static inline __attribute__((always_inline)) void rotate_head_vec(void *head, const float *cos, const float *sin,
                                                                  int half, const int is_bf16) {
    int d = 0;
    for (; d + VLEN <= half; d += VLEN) {
        const vfloat x1 = vload(head, d, is_bf16), x2 = vload(head, half + d, is_bf16);
        const vfloat c = vload_f32(cos + d), s = vload_f32(sin + d);
        vstore(head, d, vsub(vmul(x1, c), vmul(x2, s)), is_bf16);
        vstore(head, half + d, vadd(vmul(x2, c), vmul(x1, s)), is_bf16);
    }
    for (; d < half; d++) {
        const float x1 = load(head, d, is_bf16), x2 = load(head, half + d, is_bf16);
        store(head, d, x1 * cos[d] - x2 * sin[d], is_bf16);
        store(head, half + d, x2 * cos[d] + x1 * sin[d], is_bf16);
    }
}
#endif

/* p + i elements of the dtype */
static inline void *element(const void *p, int64_t i, int is_bf16) { return (char *)p + i * (is_bf16 ? 2 : 4); }

/* out[r] = weight * round(x[r] / rms(x[r])); x rows `x_stride` elements apart, out contiguous. */
static inline void rms_norm_row(const void *x, int64_t x_stride, const void *weight, void *out, int64_t r,
                                int dim, float eps, int is_bf16) {
    const int64_t in = r * x_stride, o = r * dim;
#if defined(VLEN)
    rms_norm_row_vec(element(x, in, is_bf16), NULL, weight, element(out, o, is_bf16), dim, eps, is_bf16);
    return;
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
#if defined(VLEN)
    rms_norm_row_vec(element(x, o, is_bf16), element(residual, o, is_bf16), weight, element(x, o, is_bf16), dim, eps,
                     is_bf16);
    return;
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
    const int64_t gate = r * 2 * dim, up = gate + dim, o = r * dim;
#if defined(VLEN)
    silu_and_mul_row_vec(element(x, gate, is_bf16), element(x, up, is_bf16), element(out, o, is_bf16), dim, is_bf16);
    return;
#endif
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
#if defined(VLEN)
        rotate_head_vec(element(base, start, is_bf16), cos, sin, half, is_bf16);
        continue;
#endif
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
            int64_t i = start;
#if defined(VLEN)
            vfloat top_lanes = vset1(-INFINITY);
            for (; i + VLEN <= end; i += VLEN) top_lanes = vmax(top_lanes, vload_f32(row + i));
            chunk_top = vreduce_max(top_lanes);
#endif
            for (; i < end; i++) chunk_top = row[i] > chunk_top ? row[i] : chunk_top;
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

/* The float lanes of the vector paths this library was built with: 16 (AVX-512), 8 (AVX2+FMA) or
 * 0 (portable C only). */
int vector_lanes(void) {
#if defined(VLEN)
    return VLEN;
#else
    return 0;
#endif
}
