/* y = x W^T (+ b) with W kept in llama.cpp's block formats, byte for byte as a GGUF file holds them.
 *
 * Each row of W [N, K] is K/32 groups of 32 weights (Q4_K: K/256 super-blocks of 8 groups):
 *   Q8_0  34 bytes:  fp16 d, int8 q[32]                     w = d * q
 *   Q4_0  18 bytes:  fp16 d, 16 bytes of nibbles            w = d * (q - 8)
 *   Q4_1  20 bytes:  fp16 d, fp16 m, 16 bytes of nibbles    w = d * q + m
 *   Q4_K 144 bytes:  fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles;
 *                    group j: w = (d * sc_j) * q - dmin * m_j
 * Byte i of a 4-bit group holds element i in its low nibble and element i + 16 in its high one
 * (Q4_K: 32 bytes per pair of groups, low nibbles the first group, high the second).
 *
 * Weights are dequantized in registers to float32 values equal to gguf's own dequantization
 * (each product and the one sum are exact or rounded once, as there), then multiplied with float32
 * x: results differ from dequantize-then-matmul only in the order of the float32 accumulation.
 * quant_gemv reads each weight group once and uses it for a tile of rows of x while it is in
 * registers; rows of W are shared out over OpenMP threads. quant_dequantize writes float32 rows for a GEMM.
 * x, bias and y are float32 or bf16 (`is_bf16`), contiguous.
 */
#include <omp.h>
#include <stdlib.h>

#include "common.h"

enum { Q8_0 = 8, Q4_0 = 2, Q4_1 = 3, Q4_K = 12 }; /* ggml's type ids */

#define QUANT_GEMV_TILE 8 /* rows of x a weight group is used for while in registers */
/* Rows of W ahead that are prefetched: the hardware prefetcher alone leaves the GEMV waiting on
 * memory (measured: twice as fast with it, where W is not in the caches). */
#define PREFETCH_ROWS 4

static inline int64_t row_bytes(int type, int64_t k) {
    switch (type) {
    case Q8_0: return k / 32 * 34;
    case Q4_0: return k / 32 * 18;
    case Q4_1: return k / 32 * 20;
    case Q4_K: return k / 256 * 144;
    }
    return -1;
}

#if defined(__F16C__)
#include <immintrin.h>
static inline float fp16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
#else
static inline float fp16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) bits = sign | 0x7f800000u | (mant << 13);
    else if (exp) bits = sign | ((exp + 112u) << 23) | (mant << 13);
    else if (!mant) bits = sign;
    else { /* subnormal: mant * 2^-24, exact in float32 */
        const float v = (float)mant * 5.9604644775390625e-8f;
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float x;
    memcpy(&x, &bits, 4);
    return x;
}
#endif

/* Group j's scale and min of a Q4_K super-block (llama.cpp's get_scale_min_k4). */
static inline void q4k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* A group's dequantization as w = q * scale + offset, and where its 32 codes are. */
typedef struct {
    const uint8_t *q; /* Q8_0: 32 int8; 4-bit formats: 16 bytes (shift 0/4 select the halves) or Q4_K's 32 */
    float scale, offset;
} group_t;

static inline group_t group_at(int type, const uint8_t *row, int64_t g) {
    group_t r;
    if (type == Q8_0) {
        const uint8_t *b = row + g * 34;
        r.q = b + 2, r.scale = fp16(b), r.offset = 0.0f;
    } else if (type == Q4_0) {
        const uint8_t *b = row + g * 18;
        r.q = b + 2, r.scale = fp16(b), r.offset = -8.0f * r.scale; /* q*d - 8d: both exact, so is d(q-8) */
    } else if (type == Q4_1) {
        const uint8_t *b = row + g * 20;
        r.q = b + 4, r.scale = fp16(b), r.offset = fp16(b + 2);
    } else { /* Q4_K */
        const uint8_t *b = row + (g >> 3) * 144;
        const int j = (int)(g & 7);
        int sc, m;
        q4k_scale_min(b + 4, j, &sc, &m);
        r.q = b + 16 + (j >> 1) * 32, r.scale = fp16(b) * (float)sc, r.offset = -(fp16(b + 2) * (float)m);
    }
    return r;
}

/* The code of element i (0..31) of group g, for the portable path and quant_dequantize. */
static inline float code_at(int type, const group_t *gr, int64_t g, int i) {
    if (type == Q8_0) return (float)(int8_t)gr->q[i];
    if (type == Q4_K) return (float)((gr->q[i] >> ((g & 1) * 4)) & 0xf);
    return (float)((gr->q[i & 15] >> ((i >> 4) * 4)) & 0xf);
}

#if defined(__AVX512F__)
/* 16 float lanes; a group is 2 vectors. */
typedef __m512 vec;
#define NV 2
#define vzero() _mm512_setzero_ps()
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vload(p) _mm512_loadu_ps(p)
#define vsum(v) _mm512_reduce_add_ps(v)

/* Codes are widened to 32-bit lanes straight from memory, then split into nibbles there. */
static inline void dequant(int type, group_t gr, int64_t g, vec *w) {
    __m512 s = _mm512_set1_ps(gr.scale), o;
    if (type == Q4_1) { /* d and m in one conversion: [d, m, d, m, ...] */
        int32_t dm;
        memcpy(&dm, gr.q - 4, 4);
        const __m512 pairs = _mm512_cvtph_ps(_mm256_set1_epi32(dm));
        s = _mm512_moveldup_ps(pairs), o = _mm512_movehdup_ps(pairs);
    } else {
        o = type == Q4_0 ? _mm512_mul_ps(s, _mm512_set1_ps(-8.0f)) : _mm512_set1_ps(gr.offset);
    }
    if (type == Q8_0) {
        w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)gr.q))), s);
        w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(gr.q + 16)))), s);
        return;
    }
    const __m512i low4 = _mm512_set1_epi32(0xf);
    __m512i a, b;
    if (type == Q4_K) { /* 32 bytes, one nibble each */
        const __m128i shift = _mm_cvtsi32_si128((int)(g & 1) * 4);
        a = _mm512_and_si512(_mm512_srl_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)gr.q)), shift), low4);
        b = _mm512_and_si512(_mm512_srl_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(gr.q + 16))), shift), low4);
    } else {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)gr.q));
        a = _mm512_and_si512(q, low4), b = _mm512_srli_epi32(q, 4);
    }
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, o);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), s, o);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* 8 float lanes; a group is 4 vectors. */
typedef __m256 vec;
#define NV 4
#define vzero() _mm256_setzero_ps()
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vload(p) _mm256_loadu_ps(p)

static inline float vsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

static inline __m256i widen8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }

/* Codes are widened to 32-bit lanes straight from memory, then split into nibbles there. */
static inline void dequant(int type, group_t gr, int64_t g, vec *w) {
    __m256 s = _mm256_set1_ps(gr.scale), o;
    if (type == Q4_1) { /* d and m in one conversion: [d, m, d, m, ...] */
        int32_t dm;
        memcpy(&dm, gr.q - 4, 4);
        const __m256 pairs = _mm256_cvtph_ps(_mm_set1_epi32(dm));
        s = _mm256_moveldup_ps(pairs), o = _mm256_movehdup_ps(pairs);
    } else {
        o = type == Q4_0 ? _mm256_mul_ps(s, _mm256_set1_ps(-8.0f)) : _mm256_set1_ps(gr.offset);
    }
    if (type == Q8_0) {
        for (int v = 0; v < 4; v++)
            w[v] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(gr.q + 8 * v)))), s);
        return;
    }
    const __m256i low4 = _mm256_set1_epi32(0xf);
    __m256i c[4];
    if (type == Q4_K) {
        const __m128i shift = _mm_cvtsi32_si128((int)(g & 1) * 4);
        for (int v = 0; v < 4; v++) c[v] = _mm256_and_si256(_mm256_srl_epi32(widen8(gr.q + 8 * v), shift), low4);
    } else {
        const __m256i q0 = widen8(gr.q), q1 = widen8(gr.q + 8);
        c[0] = _mm256_and_si256(q0, low4), c[1] = _mm256_and_si256(q1, low4);
        c[2] = _mm256_srli_epi32(q0, 4), c[3] = _mm256_srli_epi32(q1, 4);
    }
    for (int v = 0; v < 4; v++) w[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[v]), s, o);
}
#endif

#ifdef NV
#define VW (32 / NV)
/* Independent accumulators per row of x: enough FMA chains in flight without spilling. */
#define NACC(m_rows) ((m_rows) <= 2 ? 4 : ((m_rows) <= 4 ? 2 : 1))

static inline __attribute__((always_inline)) void dot_groups(int type, const uint8_t *row, const float *x, int m_rows,
                                                             int64_t k, float *sums) {
    const int nacc = NACC(m_rows), unroll = nacc > NV ? nacc / NV : 1;
    vec acc[QUANT_GEMV_TILE][4];
    for (int m = 0; m < m_rows; m++)
        for (int a = 0; a < nacc; a++) acc[m][a] = vzero();
    const int64_t groups = k / 32;
    int64_t g = 0;
    for (; g + unroll <= groups; g += unroll)
        for (int u = 0; u < unroll; u++) {
            vec w[NV];
            dequant(type, group_at(type, row, g + u), g + u, w);
            for (int v = 0; v < NV; v++)
                for (int m = 0; m < m_rows; m++) {
                    const int a = (u * NV + v) % nacc;
                    acc[m][a] = vfma(w[v], vload(x + m * k + (g + u) * 32 + v * VW), acc[m][a]);
                }
        }
    for (; g < groups; g++) {
        vec w[NV];
        dequant(type, group_at(type, row, g), g, w);
        for (int v = 0; v < NV; v++)
            for (int m = 0; m < m_rows; m++) acc[m][v % nacc] = vfma(w[v], vload(x + m * k + g * 32 + v * VW), acc[m][v % nacc]);
    }
    for (int m = 0; m < m_rows; m++) {
        vec s = acc[m][0];
        for (int a = 1; a < nacc; a++) s = vadd(s, acc[m][a]);
        sums[m] = vsum(s);
    }
}
#else
static inline __attribute__((always_inline)) void dot_groups(int type, const uint8_t *row, const float *x, int m_rows,
                                                             int64_t k, float *sums) {
    float acc[QUANT_GEMV_TILE][32] = {{0}};
    for (int64_t g = 0; g < k / 32; g++) {
        const group_t gr = group_at(type, row, g);
        float w[32];
        for (int i = 0; i < 32; i++) w[i] = code_at(type, &gr, g, i) * gr.scale + gr.offset;
        for (int m = 0; m < m_rows; m++)
#pragma omp simd
            for (int i = 0; i < 32; i++) acc[m][i] += w[i] * x[m * k + g * 32 + i];
    }
    for (int m = 0; m < m_rows; m++) {
        float s = 0.0f;
        for (int i = 0; i < 32; i++) s += acc[m][i];
        sums[m] = s;
    }
}
#endif

/* One instance of dot_groups per (format, rows of x), so its loops unroll and its accumulators stay
 * in registers: dot_for[format][rows](row, x, k, sums). */
typedef void (*dot_fn)(const uint8_t *row, const float *x, int64_t k, float *sums);
#define DOT_INSTANCE(T, M)                                                                                          \
    static void dot_##T##_##M(const uint8_t *row, const float *x, int64_t k, float *sums) {                        \
        dot_groups(T, row, x, M, k, sums);                                                                          \
    }
#define DOT_INSTANCES(T)                                                                                            \
    DOT_INSTANCE(T, 1) DOT_INSTANCE(T, 2) DOT_INSTANCE(T, 3) DOT_INSTANCE(T, 4) DOT_INSTANCE(T, 5)                  \
    DOT_INSTANCE(T, 6) DOT_INSTANCE(T, 7) DOT_INSTANCE(T, 8)
DOT_INSTANCES(Q8_0)
DOT_INSTANCES(Q4_0)
DOT_INSTANCES(Q4_1)
DOT_INSTANCES(Q4_K)
#define DOT_ROW(T) {NULL, dot_##T##_1, dot_##T##_2, dot_##T##_3, dot_##T##_4, dot_##T##_5, dot_##T##_6, dot_##T##_7, dot_##T##_8}

static dot_fn const dot_for[][QUANT_GEMV_TILE + 1] = {DOT_ROW(Q8_0), DOT_ROW(Q4_0), DOT_ROW(Q4_1), DOT_ROW(Q4_K)};

static inline int format_index(int type) { return type == Q8_0 ? 0 : type == Q4_0 ? 1 : type == Q4_1 ? 2 : 3; }

/* Rows [r0, r1) of y, for the rows of x in tiles of QUANT_GEMV_TILE: each weight row is read from
 * memory once and from the L1 cache for further tiles. */
static void gemv_range(int type, const uint8_t *w, const float *x, const void *bias, void *y, int m_rows,
                       int64_t n, int64_t k, int64_t r0, int64_t r1, int is_bf16) {
    const int64_t stride = row_bytes(type, k);
    dot_fn const *dot = dot_for[format_index(type)];
    for (int64_t r = r0; r < r1; r++) {
        if (r + PREFETCH_ROWS < r1)
            for (int64_t at = 0; at < stride; at += 64) __builtin_prefetch(w + (r + PREFETCH_ROWS) * stride + at);
        const float b = bias ? load(bias, r, is_bf16) : 0.0f;
        for (int m0 = 0; m0 < m_rows; m0 += QUANT_GEMV_TILE) {
            const int tile = m_rows - m0 < QUANT_GEMV_TILE ? m_rows - m0 : QUANT_GEMV_TILE;
            float sums[QUANT_GEMV_TILE];
            dot[tile](w + r * stride, x + m0 * k, k, sums);
            for (int m = 0; m < tile; m++) store(y, (m0 + m) * n + r, sums[m] + b, is_bf16);
        }
    }
}

/* This thread's share of n rows, whole rows each (the parallel regions are written out by hand: an
 * `omp for` is outlined before always_inline functions are specialised into it). */
static inline void my_rows(int64_t n, int64_t *r0, int64_t *r1) {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    *r0 = n * t / nt, *r1 = n * (t + 1) / nt;
}

/* y [M, N] = x [M, K] W^T (+ bias [N]); 0, or -1 for an unknown type, bad K or M, or no memory. */
int quant_gemv(int type, const uint8_t *w, const void *x, const void *bias, void *y, int m_rows, int64_t n, int64_t k,
               int is_bf16, int num_threads) {
    if (row_bytes(type, k) < 0 || k % (type == Q4_K ? 256 : 32) || m_rows < 1) return -1;
    const float *xf = x;
    float *converted = NULL;
    if (is_bf16) {
        converted = malloc(sizeof(float) * m_rows * k);
        if (!converted) return -1;
        for (int64_t i = 0; i < m_rows * k; i++) converted[i] = load(x, i, 1);
        xf = converted;
    }
#pragma omp parallel num_threads(threads_for(n, num_threads))
    {
        int64_t r0, r1;
        my_rows(n, &r0, &r1);
        gemv_range(type, w, xf, bias, y, m_rows, n, k, r0, r1, is_bf16);
    }
    free(converted);
    return 0;
}

static inline __attribute__((always_inline)) void dequantize_range(int type, const uint8_t *w, float *out, int64_t k,
                                                                   int64_t r0, int64_t r1) {
    const int64_t stride = row_bytes(type, k);
    for (int64_t r = r0; r < r1; r++)
        for (int64_t g = 0; g < k / 32; g++) {
            const group_t gr = group_at(type, w + r * stride, g);
            float *o = out + r * k + g * 32;
#ifdef NV
            vec v[NV];
            dequant(type, gr, g, v);
            for (int i = 0; i < NV; i++) memcpy(o + i * VW, &v[i], sizeof v[i]);
#else
            for (int i = 0; i < 32; i++) o[i] = code_at(type, &gr, g, i) * gr.scale + gr.offset;
#endif
        }
}

/* out [n, k] float32 = rows [0, n) of W dequantized; 0, or -1 for an unknown type or bad K. */
int quant_dequantize(int type, const uint8_t *w, float *out, int64_t n, int64_t k, int num_threads) {
    if (row_bytes(type, k) < 0 || k % (type == Q4_K ? 256 : 32)) return -1;
#pragma omp parallel num_threads(threads_for(n, num_threads))
    {
        int64_t r0, r1;
        my_rows(n, &r0, &r1);
        switch (type) {
        case Q8_0: dequantize_range(Q8_0, w, out, k, r0, r1); break;
        case Q4_0: dequantize_range(Q4_0, w, out, k, r0, r1); break;
        case Q4_1: dequantize_range(Q4_1, w, out, k, r0, r1); break;
        case Q4_K: dequantize_range(Q4_K, w, out, k, r0, r1); break;
        }
    }
    return 0;
}

