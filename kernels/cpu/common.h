/* What every CPU kernel shares: bf16 and float32 element access. */
#ifndef CONVEYOR_CPU_COMMON_H
#define CONVEYOR_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

/* Element access for both dtypes; `is_bf16` is a constant in each kernel's entry points, so the
 * compiler specialises (and vectorises) one copy of the kernel per dtype. */
static inline float load(const void *p, int64_t i, int is_bf16) {
    if (!is_bf16) return ((const float *)p)[i];
    uint32_t bits = (uint32_t)((const bf16 *)p)[i] << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static inline void store(void *p, int64_t i, float x, int is_bf16) {
    if (!is_bf16) {
        ((float *)p)[i] = x;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) bits |= 0x400000u; /* NaN stays a quiet NaN */
    else bits += 0x7fffu + ((bits >> 16) & 1u);                  /* round to nearest even */
    ((bf16 *)p)[i] = (bf16)(bits >> 16);
}

/* exp(x) without a libm call, so loops around it vectorise (Cephes' expf): x = n ln2 + r with
 * |r| <= ln2/2, exp(r) by a degree-7 polynomial, 2^n put straight into the exponent bits. Relative
 * error about 1e-7; inputs are clamped to the range where the result is a normal float. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f; /* ln2 in two parts (Cody-Waite) */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* exp_approx, 16 lanes: the same reduction and polynomial, with vscalefps for the 2^n. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* x as the dtype would hold it (rounded to bf16, or unchanged). */
static inline float round_as(float x, int is_bf16) {
    if (!is_bf16) return x;
    bf16 held;
    store(&held, 0, x, 1);
    return load(&held, 0, 1);
}

/* Rows per OpenMP thread below which a kernel runs on the calling thread alone (waking the pool
 * costs more than a few short rows). */
#define MIN_ROWS_PER_THREAD 8

static inline int threads_for(int64_t rows, int num_threads) {
    const int64_t useful = rows / MIN_ROWS_PER_THREAD;
    return useful < 1 ? 1 : (useful < num_threads ? (int)useful : num_threads);
}

#endif
