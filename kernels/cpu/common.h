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

/* One vector of floats, for the kernels written once for every x86 vector width: VLEN lanes of
 * AVX-512 or of AVX2+FMA, with bf16 widened on load (a 16-bit shift) and rounded to the nearest
 * even on store, as store() does. Undefined elsewhere, where the portable paths run. */
#if defined(__AVX512F__)
#define VLEN 16
typedef __m512 vfloat;
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vmax _mm512_max_ps
#define vfmadd _mm512_fmadd_ps /* a * b + c */
#define vexp exp16
#define vreduce_add _mm512_reduce_add_ps
#define vreduce_max _mm512_reduce_max_ps
#define vload_f32 _mm512_loadu_ps
#define vstore_f32 _mm512_storeu_ps
typedef __m512i vint;
static inline vfloat vload_bf16(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* a / b to float precision: vrcp14ps and one Newton step, cheaper than a division */
static inline vfloat vdiv(vfloat a, vfloat b) {
    const vfloat r = _mm512_rcp14_ps(b);
    return _mm512_mul_ps(a, _mm512_mul_ps(r, _mm512_fnmadd_ps(b, r, _mm512_set1_ps(2.0f))));
}
/* x rounded to bf16 (nearest even, NaN kept quiet), left in the high half of each lane */
static inline vint vround_bits(vfloat x) {
    const vint bits = _mm512_castps_si512(x);
    const vint lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const vint rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x400000));
}
static inline void vstore_bf16(bf16 *p, vfloat x) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(vround_bits(x), 16)));
}
static inline vfloat vround_bf16(vfloat x) {
    return _mm512_castsi512_ps(_mm512_and_si512(vround_bits(x), _mm512_set1_epi32((int)0xffff0000u)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VLEN 8
typedef __m256 vfloat;
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vmax _mm256_max_ps
#define vfmadd _mm256_fmadd_ps
#define vload_f32 _mm256_loadu_ps
#define vstore_f32 _mm256_storeu_ps
typedef __m256i vint;
static inline vfloat vload_bf16(const bf16 *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#define vdiv _mm256_div_ps
static inline float vreduce_add(vfloat v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
static inline float vreduce_max(vfloat v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
/* exp_approx, 8 lanes: 2^n built in the exponent bits (n + 127 stays in 1..254 after the clamp) */
static inline vfloat vexp(vfloat x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
    const vfloat n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    const vfloat r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
    vfloat p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}
static inline vint vround_bits(vfloat x) {
    const vint bits = _mm256_castps_si256(x);
    const vint lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const vint rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const vint nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), nan);
}
static inline void vstore_bf16(bf16 *p, vfloat x) {
    const vint high = _mm256_srli_epi32(vround_bits(x), 16); /* 8 values in 0..65535: packs without saturating */
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
    _mm_storeu_si128((__m128i *)p, packed);
}
static inline vfloat vround_bf16(vfloat x) {
    return _mm256_castsi256_ps(_mm256_and_si256(vround_bits(x), _mm256_set1_epi32((int)0xffff0000u)));
}
#endif

#if defined(VLEN)
/* VLEN elements from p + i of either dtype, as floats (IS_BF16 a literal in every caller) */
static inline __attribute__((always_inline)) vfloat vload(const void *p, int64_t i, const int is_bf16) {
    return is_bf16 ? vload_bf16((const bf16 *)p + i) : vload_f32((const float *)p + i);
}
static inline __attribute__((always_inline)) void vstore(void *p, int64_t i, vfloat x, const int is_bf16) {
    if (is_bf16) vstore_bf16((bf16 *)p + i, x);
    else vstore_f32((float *)p + i, x);
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
