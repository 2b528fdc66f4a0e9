/* Paged attention on the CPU, read straight from the block KV cache (no gathered copy of the
 * context), for any mix of decodes and prefill chunks; and the store of each step's keys and values.
 *
 * Layouts (the contract of docs/architecture.md): q [num_tokens, num_heads, head_dim] with tokens
 * q_stride elements apart (heads packed), out the same but contiguous; k_cache and v_cache
 * [num_blocks, block_size, num_kv_heads, head_dim]; block_tables [num_seqs, max_blocks] int32;
 * seq_lens [num_seqs] int32 (context including this step's tokens); query_start_loc [num_seqs + 1]
 * int32. Query token i of a sequence attends causally to its context up to its own position. Each
 * decode token is one work item, shared out over OpenMP threads; so is each prefill token, except in
 * bf16 with head_dim 64 or 128 on AVX512-BF16, where prefill chunks go in tiles of 16 query tokens
 * per KV head (prefill_tiles_bf16: each block of keys is packed once for the whole tile rather than
 * read once per query token; docs/benchmarks.md). Accumulation is in float32. Returns 0, or -1 if a scratch allocation failed.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

/* Offset of context token t in a cache: block sizes are powers of two, so shifts, not divisions. */
static inline int64_t token_base(const int32_t *table, int t, int block_size, int64_t token_stride) {
    const int shift = __builtin_ctz((unsigned)block_size);
    return (((int64_t)table[t >> shift] << shift) + (t & (block_size - 1))) * token_stride;
}

/* Rows are fetched this many tokens ahead: blocks sit anywhere in the cache, so the hardware
 * prefetcher loses the stream at every block boundary. */
#define PREFETCH_DISTANCE 16

static inline void prefetch_row(const void *cache, const int32_t *table, int t, int block_size,
                                int64_t token_stride, int is_bf16) {
    const char *row = (const char *)cache + token_base(table, t, block_size, token_stride) * (is_bf16 ? 2 : 4);
    const int64_t bytes = token_stride * (is_bf16 ? 2 : 4);
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(row + offset);
}

/* Softmax of one query head's n scores, in place; returns 1/sum (applied to the output at the end). */
static inline float softmax_unnormalised(float *sh, int n) {
    float top = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : top)
    for (int i = 0; i < n; i++) top = sh[i] > top ? sh[i] : top;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) {
        sh[i] = exp_approx(sh[i] - top);
        sum += sh[i];
    }
    return 1.0f / sum;
}

#if defined(__AVX512F__)
/* r[i] = the sum of v[i]'s 16 lanes: a transposing tree of 15 shuffle-and-add steps instead of 16
 * horizontal reductions. The tree leaves the sums of v[4..7] and v[8..11] swapped; the final
 * permute puts them back. */
static inline __m512 sum_each16(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x88), _mm512_shuffle_f32x4(a[i], a[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[i], b[i + 2]), _mm512_unpackhi_ps(b[i], b[i + 2]));
    const __m512 d = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15), d);
}

#define sum_each sum_each16
#elif defined(VLEN)
/* r[i] = the sum of v[i]'s 8 lanes: two rounds of pairwise adds, then the 128-bit halves added. */
static inline __m256 sum_each8(const __m256 v[8]) {
    const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}
#define sum_each sum_each8
#endif

#if defined(VLEN)
/* q . k of one cached row, starting at element `at` of the cache: HD/VLEN products summed
 * lane-wise (q already scaled). */
static inline __attribute__((always_inline)) vfloat row_dot(const vfloat *qv, const void *cache, int64_t at,
                                                            const int HD, const int is_bf16) {
    vfloat acc = vmul(qv[0], vload(cache, at, is_bf16));
    for (int c = 1; c < HD / VLEN; c++) acc = vfmadd(qv[c], vload(cache, at + VLEN * c, is_bf16), acc);
    return acc;
}

/* Two sets of p . v accumulators where one set has too few vectors to keep the FMAs busy. */
#define PV_SPLIT(HD) ((HD) / VLEN < 8)

/* `attend` in float32 vectors (bf16 widened on load) with head_dim HD (a literal, a multiple of
 * VLEN), one query head at a time: q . k for VLEN tokens at once, summed by one transposing tree;
 * p . v for two tokens at a time, into two sets of accumulators where PV_SPLIT. */
static inline __attribute__((always_inline)) void attend_vec(
    const void *q, const void *k_cache, const void *v_cache, void *out, const int32_t *table, int len, int first,
    int num_heads, int num_kv_heads, int block_size, float scale, float *scores, const int HD, const int is_bf16) {
    const int n = len - first, group = num_heads / num_kv_heads;
    const int64_t token_stride = (int64_t)num_kv_heads * HD;
    for (int hq = 0; hq < num_heads; hq++) {
        const int64_t kv_offset = (int64_t)(hq / group) * HD;
        float *sh = scores + (int64_t)hq * n;
        vfloat qv[HD / VLEN];
        for (int c = 0; c < HD / VLEN; c++) qv[c] = vmul(vload(q, (int64_t)hq * HD + VLEN * c, is_bf16), vset1(scale));
        int t = first;
        for (; t + VLEN <= len; t += VLEN) {
            vfloat dots[VLEN];
            for (int j = 0; j < VLEN; j++) {
                if (hq == 0 && t + j + PREFETCH_DISTANCE < len)
                    prefetch_row(k_cache, table, t + j + PREFETCH_DISTANCE, block_size, token_stride, is_bf16);
                dots[j] = row_dot(qv, k_cache, token_base(table, t + j, block_size, token_stride) + kv_offset, HD,
                                  is_bf16);
            }
            vstore_f32(sh + (t - first), sum_each(dots));
        }
        for (; t < len; t++)
            sh[t - first] = vreduce_add(
                row_dot(qv, k_cache, token_base(table, t, block_size, token_stride) + kv_offset, HD, is_bf16));

        const vfloat inv_sum = vset1(softmax_unnormalised(sh, n));
        vfloat even[HD / VLEN], odd[PV_SPLIT(HD) ? HD / VLEN : 1];
        for (int c = 0; c < HD / VLEN; c++) even[c] = vzero();
        for (int c = 0; c < (PV_SPLIT(HD) ? HD / VLEN : 1); c++) odd[c] = vzero();
        int i = 0;
        for (; i + 2 <= n; i += 2) {
            if (hq == 0 && first + i + 1 + PREFETCH_DISTANCE < len) {
                prefetch_row(v_cache, table, first + i + PREFETCH_DISTANCE, block_size, token_stride, is_bf16);
                prefetch_row(v_cache, table, first + i + 1 + PREFETCH_DISTANCE, block_size, token_stride, is_bf16);
            }
            const int64_t v0 = token_base(table, first + i, block_size, token_stride) + kv_offset;
            const int64_t v1 = token_base(table, first + i + 1, block_size, token_stride) + kv_offset;
            const vfloat p0 = vset1(sh[i]), p1 = vset1(sh[i + 1]);
            for (int c = 0; c < HD / VLEN; c++) {
                even[c] = vfmadd(p0, vload(v_cache, v0 + VLEN * c, is_bf16), even[c]);
                if (PV_SPLIT(HD)) odd[c] = vfmadd(p1, vload(v_cache, v1 + VLEN * c, is_bf16), odd[c]);
                else even[c] = vfmadd(p1, vload(v_cache, v1 + VLEN * c, is_bf16), even[c]);
            }
        }
        if (i < n) {
            const int64_t v0 = token_base(table, first + i, block_size, token_stride) + kv_offset;
            const vfloat p0 = vset1(sh[i]);
            for (int c = 0; c < HD / VLEN; c++) even[c] = vfmadd(p0, vload(v_cache, v0 + VLEN * c, is_bf16), even[c]);
        }
        for (int c = 0; c < HD / VLEN; c++) {
            const vfloat sum = PV_SPLIT(HD) ? vadd(even[c], odd[c]) : even[c];
            vstore(out, (int64_t)hq * HD + VLEN * c, vmul(sum, inv_sum), is_bf16);
        }
    }
}

/* attend_vec specialised for the head_dim and dtype; returns 0 where head_dim has no vector path. */
static int attend_vec_any(const void *q, const void *k_cache, const void *v_cache, void *out, const int32_t *table,
                          int len, int first, int num_heads, int num_kv_heads, int head_dim, int block_size,
                          float scale, float *scores, int is_bf16) {
#define ATTEND_CASE(HD)                                                                                       \
    case HD:                                                                                                  \
        if (is_bf16)                                                                                          \
            attend_vec(q, k_cache, v_cache, out, table, len, first, num_heads, num_kv_heads, block_size, scale, \
                       scores, HD, 1);                                                                        \
        else                                                                                                  \
            attend_vec(q, k_cache, v_cache, out, table, len, first, num_heads, num_kv_heads, block_size, scale, \
                       scores, HD, 0);                                                                        \
        return 1;
    switch (head_dim) {
        ATTEND_CASE(16)
        ATTEND_CASE(32)
        ATTEND_CASE(64)
        ATTEND_CASE(128)
    }
#undef ATTEND_CASE
    return 0;
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__)

/* q . k of one cached row: HD/32 bf16 pair products summed lane-wise. */
static inline __attribute__((always_inline)) __m512 row_dot_bf16(const __m512bh *qv, const bf16 *kh, const int HD) {
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < HD / 32; c++) acc = _mm512_dpbf16_ps(acc, qv[c], (__m512bh)_mm512_loadu_si512(kh + 32 * c));
    return acc;
}

/* Fetch this KV head's slice of token t's row ahead of use (HD bf16: 2 or 4 cache lines). */
static inline void prefetch_head(const bf16 *cache, const int32_t *table, int t, int block_size, int64_t token_stride,
                                 int64_t kv_offset, const int HD) {
    const char *p = (const char *)(cache + token_base(table, t, block_size, token_stride) + kv_offset);
    for (int offset = 0; offset < HD * 2; offset += 64) __builtin_prefetch(p + offset);
}

/* Query heads a p . v pass carries at once: their accumulators (2 * HD/32 vectors each) stay in
 * registers beside the interleaved value rows they share. */
#define PV_HEADS(HD) ((HD) == 64 ? 4 : 2)

/* A KV head's pass reads a third or less of each row: it runs through rows faster, so it fetches
 * further ahead to cover the memory's latency. */
#define HEAD_PREFETCH_DISTANCE 64

/* `attend` for bf16 with head_dim HD, a literal (so every per-dimension loop unrolls and its
 * accumulators stay in registers), one KV head at a time, with all the query heads of its group:
 * each key and value row is read from memory once, not once per query head (a group's rows fall
 * out of L2 at long contexts, so a pass per query head would stream them from memory again).
 * - q . k: 16 keys' rows at a time, every query head of the group against them while they sit in
 *   L1; each head's 16 dot products (vdpbf16ps) summed by one transposing tree;
 * - p . v: two keys per vdpbf16ps, their value rows interleaved once for up to PV_HEADS query
 *   heads, whose probabilities go in as bf16 pairs (as transformers' eager bf16 attention also
 *   rounds them to bf16).
 * `scores` holds num_heads rows of n floats, `probs` num_heads rows of n + 2 bf16. */
static inline __attribute__((always_inline)) void attend_bf16(
    const bf16 *q, const bf16 *k_cache, const bf16 *v_cache, bf16 *out, const int32_t *table, int len,
    int first, int num_heads, int num_kv_heads, int block_size, float scale, float *scores, bf16 *probs,
    const int HD) {
    const int n = len - first, group = num_heads / num_kv_heads;
    const int64_t token_stride = (int64_t)num_kv_heads * HD, prow = n + 2;
    for (int kvh = 0; kvh < num_kv_heads; kvh++) {
        const int64_t kv_offset = (int64_t)kvh * HD;
        const int h0 = kvh * group;

        int t = first;
        for (; t + 16 <= len; t += 16) {
            const bf16 *rows[16];
            for (int j = 0; j < 16; j++) {
                if (t + j + HEAD_PREFETCH_DISTANCE < len)
                    prefetch_head(k_cache, table, t + j + HEAD_PREFETCH_DISTANCE, block_size, token_stride, kv_offset, HD);
                rows[j] = k_cache + token_base(table, t + j, block_size, token_stride) + kv_offset;
            }
            for (int g = 0; g < group; g++) {
                const bf16 *qh = q + (int64_t)(h0 + g) * HD;
                __m512bh qv[HD / 32];
                for (int c = 0; c < HD / 32; c++) qv[c] = (__m512bh)_mm512_loadu_si512(qh + 32 * c);
                __m512 dots[16];
                for (int j = 0; j < 16; j++) dots[j] = row_dot_bf16(qv, rows[j], HD);
                _mm512_storeu_ps(scores + (int64_t)(h0 + g) * n + (t - first),
                                 _mm512_mul_ps(sum_each16(dots), _mm512_set1_ps(scale)));
            }
        }
        for (; t < len; t++) {
            const bf16 *row = k_cache + token_base(table, t, block_size, token_stride) + kv_offset;
            for (int g = 0; g < group; g++) {
                const bf16 *qh = q + (int64_t)(h0 + g) * HD;
                __m512bh qv[HD / 32];
                for (int c = 0; c < HD / 32; c++) qv[c] = (__m512bh)_mm512_loadu_si512(qh + 32 * c);
                scores[(int64_t)(h0 + g) * n + (t - first)] = _mm512_reduce_add_ps(row_dot_bf16(qv, row, HD)) * scale;
            }
        }

        float inv_sum[group];
        for (int g = 0; g < group; g++) {
            float *sh = scores + (int64_t)(h0 + g) * n;
            bf16 *ph = probs + (int64_t)(h0 + g) * prow;
            inv_sum[g] = softmax_unnormalised(sh, n);
#pragma omp simd
            for (int i = 0; i < n; i++) store(ph, i, sh[i], 1);
            ph[n] = 0; /* pairs an odd last token with a zero probability */
        }

        /* lo holds dims 0-3, 8-11, 16-19, 24-27 of each 32; hi the others */
        const __m512i first16 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
        const __m512i last16 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
        for (int g0 = 0; g0 < group; g0 += PV_HEADS(HD)) {
            const int m = group - g0 < PV_HEADS(HD) ? group - g0 : PV_HEADS(HD);
            __m512 lo[PV_HEADS(HD)][HD / 32], hi[PV_HEADS(HD)][HD / 32];
            for (int s = 0; s < PV_HEADS(HD); s++)
                for (int c = 0; c < HD / 32; c++) lo[s][c] = hi[s][c] = _mm512_setzero_ps();
            for (int i = 0; i < n; i += 2) {
                if (first + i + HEAD_PREFETCH_DISTANCE < len) {
                    prefetch_head(v_cache, table, first + i + HEAD_PREFETCH_DISTANCE, block_size, token_stride, kv_offset, HD);
                    if (first + i + 1 + HEAD_PREFETCH_DISTANCE < len)
                        prefetch_head(v_cache, table, first + i + 1 + HEAD_PREFETCH_DISTANCE, block_size, token_stride,
                                      kv_offset, HD);
                }
                const bf16 *v0 = v_cache + token_base(table, first + i, block_size, token_stride) + kv_offset;
                const bf16 *v1 = i + 1 < n ? v_cache + token_base(table, first + i + 1, block_size, token_stride) + kv_offset
                                           : v0; /* any finite row: its probability is 0 */
                __m512bh ulo[HD / 32], uhi[HD / 32];
                for (int c = 0; c < HD / 32; c++) {
                    const __m512i a = _mm512_loadu_si512(v0 + 32 * c), b = _mm512_loadu_si512(v1 + 32 * c);
                    ulo[c] = (__m512bh)_mm512_unpacklo_epi16(a, b);
                    uhi[c] = (__m512bh)_mm512_unpackhi_epi16(a, b);
                }
                for (int s = 0; s < PV_HEADS(HD); s++) {
                    if (s >= m) break;
                    uint32_t pair;
                    memcpy(&pair, probs + (int64_t)(h0 + g0 + s) * prow + i, sizeof pair);
                    const __m512bh p = (__m512bh)_mm512_set1_epi32((int)pair);
                    for (int c = 0; c < HD / 32; c++) {
                        lo[s][c] = _mm512_dpbf16_ps(lo[s][c], ulo[c], p);
                        hi[s][c] = _mm512_dpbf16_ps(hi[s][c], uhi[c], p);
                    }
                }
            }
            for (int s = 0; s < m; s++) {
                const __m512 inv = _mm512_set1_ps(inv_sum[g0 + s]);
                float o[HD];
                for (int c = 0; c < HD / 32; c++) {
                    _mm512_storeu_ps(o + 32 * c, _mm512_mul_ps(_mm512_permutex2var_ps(lo[s][c], first16, hi[s][c]), inv));
                    _mm512_storeu_ps(o + 32 * c + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo[s][c], last16, hi[s][c]), inv));
                }
                for (int d = 0; d < HD; d++) store(out, (int64_t)(h0 + g0 + s) * HD + d, o[d], 1);
            }
        }
    }
}

/* Prefill chunks in bf16, a tile at a time: TILE_Q consecutive query tokens of one sequence and
 * the query heads of one KV head against blocks of KEY_BLOCK keys, flash-attention style (a running
 * maximum and sum per query row, so no row of scores is kept). Each key block is gathered from the
 * paged cache once per tile and packed in bf16 pairs, so that q . k gives 16 keys' scores in one
 * vector (no sum across lanes per key) and p . v adds two keys per vdpbf16ps: the packed block
 * serves every row of the tile (TILE_Q tokens times the heads of the group), where the per-token
 * path reads each key row once per query token. */
#define TILE_Q 16
#define KEY_BLOCK 16

/* One tile: query tokens q0 .. q0+rows-1 of a sequence whose q_len query tokens end its seq_len
 * context, and the query heads of KV head kvh. `q` and `out` point at the tile's first token.
 * Scratch: kpack and vpack hold one packed key block (KEY_BLOCK * HD bf16 each), acc the rows'
 * float32 outputs and m, l their running maxima and sums (rows * group of each). */
static inline __attribute__((always_inline)) void prefill_tile_bf16(
    const bf16 *q, int64_t q_stride, const bf16 *k_cache, const bf16 *v_cache, bf16 *out, const int32_t *table,
    int seq_len, int q_len, int q0, int rows, int kvh, int num_heads, int num_kv_heads, int block_size,
    float scale, int sliding_window, uint32_t *kpack, uint32_t *vpack, float *acc, float *m, float *l,
    const int HD) {
    const int group = num_heads / num_kv_heads;
    const int64_t token_stride = (int64_t)num_kv_heads * HD;
    const int pos0 = seq_len - q_len + q0; /* position of the tile's first query token */
    const int key_end = pos0 + rows;       /* keys the last row sees: 0 .. pos0 + rows - 1 */
    int key_start = 0;
    if (sliding_window > 0 && pos0 - sliding_window + 1 > 0) key_start = pos0 - sliding_window + 1;
    for (int i = 0; i < rows * group; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * rows * group * HD);

    for (int kb = key_start; kb < key_end; kb += KEY_BLOCK) {
        const int nk = key_end - kb < KEY_BLOCK ? key_end - kb : KEY_BLOCK;
        /* kpack[d2][j]: dims 2*d2, 2*d2+1 of key j; vpack[j2][d]: dim d of keys 2*j2, 2*j2+1. Keys past
         * nk are zeros (their rows may hold anything, even NaN: never read). */
        for (int j = 0; j < KEY_BLOCK; j++) {
            if (j < nk) {
                const int64_t base = token_base(table, kb + j, block_size, token_stride) + (int64_t)kvh * HD;
                const uint32_t *krow = (const uint32_t *)(k_cache + base);
                for (int d2 = 0; d2 < HD / 2; d2++) kpack[d2 * KEY_BLOCK + j] = krow[d2];
                const bf16 *vrow = v_cache + base;
                bf16 *vp = (bf16 *)vpack;
                for (int d = 0; d < HD; d++) vp[2 * ((j >> 1) * HD + d) + (j & 1)] = vrow[d];
            } else {
                for (int d2 = 0; d2 < HD / 2; d2++) kpack[d2 * KEY_BLOCK + j] = 0;
                bf16 *vp = (bf16 *)vpack;
                for (int d = 0; d < HD; d++) vp[2 * ((j >> 1) * HD + d) + (j & 1)] = 0;
            }
        }
        for (int r = 0; r < rows; r++) {
            const int pos = pos0 + r;
            if (kb > pos) continue; /* the whole block lies after this row (later rows see more) */
            int lo = 0, hi = pos - kb + 1; /* visible lanes [lo, hi) */
            if (hi > nk) hi = nk;
            if (sliding_window > 0 && pos - sliding_window + 1 > kb) lo = pos - sliding_window + 1 - kb;
            if (lo >= hi) continue;
            const __mmask16 visible = (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
            for (int g = 0; g < group; g++) {
                const int hq = kvh * group + g, row = r * group + g;
                const uint32_t *qh = (const uint32_t *)(q + (int64_t)r * q_stride + (int64_t)hq * HD);
                __m512 part[4]; /* independent chains: one chain of HD/2 dependent vdpbf16ps would stall */
                for (int k = 0; k < 4; k++) part[k] = _mm512_setzero_ps();
                for (int d2 = 0; d2 < HD / 2; d2 += 4)
                    for (int k = 0; k < 4; k++)
                        part[k] = _mm512_dpbf16_ps(part[k], (__m512bh)_mm512_set1_epi32((int)qh[d2 + k]),
                                                   (__m512bh)_mm512_loadu_si512(kpack + (d2 + k) * KEY_BLOCK));
                __m512 s = _mm512_add_ps(_mm512_add_ps(part[0], part[1]), _mm512_add_ps(part[2], part[3]));
                s = _mm512_mask_blend_ps(visible, _mm512_set1_ps(-INFINITY), _mm512_mul_ps(s, _mm512_set1_ps(scale)));
                const float block_max = _mm512_reduce_max_ps(s);
                const float m_new = block_max > m[row] ? block_max : m[row];
                const __m512 p = _mm512_maskz_mov_ps(visible, exp16(_mm512_sub_ps(s, _mm512_set1_ps(m_new))));
                float *o = acc + (int64_t)row * HD;
                if (m_new > m[row]) {
                    const float correction = m[row] == -INFINITY ? 0.0f : exp_approx(m[row] - m_new);
                    l[row] *= correction;
                    const __m512 c = _mm512_set1_ps(correction);
                    for (int d = 0; d < HD; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), c));
                    m[row] = m_new;
                }
                l[row] += _mm512_reduce_add_ps(p);
                uint32_t pairs[KEY_BLOCK / 2];
                _mm256_storeu_si256((__m256i *)pairs, (__m256i)_mm512_cvtneps_pbh(p));
                __m512 ov[HD / 16];
                for (int c = 0; c < HD / 16; c++) ov[c] = _mm512_loadu_ps(o + 16 * c);
                for (int j2 = 0; j2 < (nk + 1) / 2; j2++) {
                    const __m512bh pp = (__m512bh)_mm512_set1_epi32((int)pairs[j2]);
                    for (int c = 0; c < HD / 16; c++)
                        ov[c] = _mm512_dpbf16_ps(ov[c], pp, (__m512bh)_mm512_loadu_si512(vpack + j2 * HD + 16 * c));
                }
                for (int c = 0; c < HD / 16; c++) _mm512_storeu_ps(o + 16 * c, ov[c]);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < group; g++) {
            const int hq = kvh * group + g, row = r * group + g;
            const float inv = 1.0f / l[row];
            for (int d = 0; d < HD; d++)
                store(out, (int64_t)r * num_heads * HD + (int64_t)hq * HD + d, acc[(int64_t)row * HD + d] * inv, 1);
        }
}
#endif

/* One work item: every query head of one query token. A context token's keys (or values) for all KV
 * heads are one contiguous row of the cache, so each token costs one streaming read. */
static inline void attend(const void *q, const void *k_cache, const void *v_cache, void *out,
                          const int32_t *table, int len, int first, int64_t q_offset, int64_t out_offset,
                          int num_heads,
                          int num_kv_heads, int head_dim, int block_size, float scale, float *qf,
                          float *acc, float *row, float *scores, int is_bf16) {
    const int n = len - first, group = num_heads / num_kv_heads;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;

#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (is_bf16 && head_dim % 32 == 0) { /* q . k straight from the bf16 cache, 32 products an instruction */
        const bf16 *qb = (const bf16 *)q + q_offset;
        for (int t = first; t < len; t++) {
            const bf16 *k_row = (const bf16 *)k_cache + token_base(table, t, block_size, token_stride);
            if (t + PREFETCH_DISTANCE < len) prefetch_row(k_cache, table, t + PREFETCH_DISTANCE, block_size, token_stride, 1);
            for (int hq = 0; hq < num_heads; hq++) {
                const bf16 *qh = qb + (int64_t)hq * head_dim, *kh = k_row + (int64_t)(hq / group) * head_dim;
                __m512 acc_qk = _mm512_setzero_ps();
                for (int d = 0; d < head_dim; d += 32)
                    acc_qk = _mm512_dpbf16_ps(acc_qk, (__m512bh)_mm512_loadu_si512(qh + d),
                                              (__m512bh)_mm512_loadu_si512(kh + d));
                scores[(int64_t)hq * n + (t - first)] = _mm512_reduce_add_ps(acc_qk) * scale;
            }
        }
    } else
#endif
    { /* scores = q . k in float32 */
        for (int i = 0; i < num_heads * head_dim; i++) qf[i] = load(q, q_offset + i, is_bf16) * scale;
        for (int t = first; t < len; t++) {
            const int64_t base = token_base(table, t, block_size, token_stride);
            if (t + PREFETCH_DISTANCE < len)
                prefetch_row(k_cache, table, t + PREFETCH_DISTANCE, block_size, token_stride, is_bf16);
            for (int i = 0; i < token_stride; i++) row[i] = load(k_cache, base + i, is_bf16);
            for (int hq = 0; hq < num_heads; hq++) {
                const float *qh = qf + (int64_t)hq * head_dim, *kh = row + (int64_t)(hq / group) * head_dim;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int d = 0; d < head_dim; d++) s += qh[d] * kh[d];
                scores[(int64_t)hq * n + (t - first)] = s;
            }
        }
    }

    float inv_sum[num_heads];
    for (int hq = 0; hq < num_heads; hq++) inv_sum[hq] = softmax_unnormalised(scores + (int64_t)hq * n, n);

    memset(acc, 0, sizeof(float) * num_heads * head_dim);
    for (int t = first; t < len; t++) { /* out = p . v */
        const int64_t base = token_base(table, t, block_size, token_stride);
        if (t + PREFETCH_DISTANCE < len) prefetch_row(v_cache, table, t + PREFETCH_DISTANCE, block_size, token_stride, is_bf16);
        for (int i = 0; i < token_stride; i++) row[i] = load(v_cache, base + i, is_bf16);
        for (int hq = 0; hq < num_heads; hq++) {
            const float p = scores[(int64_t)hq * n + (t - first)];
            const float *vh = row + (int64_t)(hq / group) * head_dim;
            float *ah = acc + (int64_t)hq * head_dim;
#pragma omp simd
            for (int d = 0; d < head_dim; d++) ah[d] += p * vh[d];
        }
    }
    for (int hq = 0; hq < num_heads; hq++)
        for (int d = 0; d < head_dim; d++)
            store(out, out_offset + (int64_t)hq * head_dim + d, acc[hq * head_dim + d] * inv_sum[hq], is_bf16);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
/* Every prefill chunk (a sequence with more than one query token) of the batch, tile by tile:
 * work items are (tile, KV head), the last tiles of each sequence (the longest contexts) first. */
static int prefill_tiles_bf16(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                              const int32_t *block_tables, const int32_t *seq_lens, const int32_t *query_start_loc,
                              int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size,
                              int max_blocks, float scale, int sliding_window, int num_threads) {
    int num_tiles = 0;
    for (int b = 0; b < num_seqs; b++) {
        const int q_len = query_start_loc[b + 1] - query_start_loc[b];
        if (q_len > 1) num_tiles += (q_len + TILE_Q - 1) / TILE_Q;
    }
    if (num_tiles == 0) return 0;
    int32_t *tiles = malloc(sizeof(int32_t) * 2 * num_tiles); /* (sequence, first query token) */
    if (!tiles) return 1;
    int n = 0;
    for (int b = 0; b < num_seqs; b++) {
        const int q_len = query_start_loc[b + 1] - query_start_loc[b];
        if (q_len > 1)
            for (int q0 = ((q_len - 1) / TILE_Q) * TILE_Q; q0 >= 0; q0 -= TILE_Q) {
                tiles[2 * n] = b;
                tiles[2 * n + 1] = q0;
                n++;
            }
    }
    const int group = num_heads / num_kv_heads, items = num_tiles * num_kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        uint32_t *kpack = malloc(sizeof(uint32_t) * KEY_BLOCK * head_dim / 2);
        uint32_t *vpack = malloc(sizeof(uint32_t) * KEY_BLOCK * head_dim / 2);
        float *acc = malloc(sizeof(float) * TILE_Q * group * head_dim);
        float *m = malloc(sizeof(float) * TILE_Q * group), *l = malloc(sizeof(float) * TILE_Q * group);
        const int ready = kpack && vpack && acc && m && l;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < items; item++) {
            if (!ready) continue;
            {
                const int tile = item / num_kv_heads, kvh = item % num_kv_heads;
                const int b = tiles[2 * tile], q0 = tiles[2 * tile + 1];
                const int q_len = query_start_loc[b + 1] - query_start_loc[b];
                const int rows = q_len - q0 < TILE_Q ? q_len - q0 : TILE_Q;
                const int64_t t = query_start_loc[b] + q0; /* the tile's first token in the batch */
                const bf16 *qt = (const bf16 *)q + t * q_stride;
                bf16 *ot = (bf16 *)out + t * num_heads * head_dim;
                const int32_t *table = block_tables + (int64_t)b * max_blocks;
                if (head_dim == 64)
                    prefill_tile_bf16(qt, q_stride, k_cache, v_cache, ot, table, seq_lens[b], q_len, q0, rows, kvh,
                                      num_heads, num_kv_heads, block_size, scale, sliding_window, kpack, vpack, acc,
                                      m, l, 64);
                else
                    prefill_tile_bf16(qt, q_stride, k_cache, v_cache, ot, table, seq_lens[b], q_len, q0, rows, kvh,
                                      num_heads, num_kv_heads, block_size, scale, sliding_window, kpack, vpack, acc,
                                      m, l, 128);
            }
        }
        free(kpack);
        free(vpack);
        free(acc);
        free(m);
        free(l);
    }
    free(tiles);
    return failed;
}
#endif

static inline int paged_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                                  void *out, const int32_t *block_tables, const int32_t *seq_lens,
                                  const int32_t *query_start_loc, int num_seqs, int num_heads, int num_kv_heads,
                                  int head_dim, int block_size, int max_blocks, float scale, int sliding_window,
                                  int num_threads, int is_bf16) {
    const int num_tokens = query_start_loc[num_seqs];
    int32_t *token_seq = malloc(sizeof(int32_t) * (num_tokens > 0 ? num_tokens : 1));
    if (!token_seq) return -1;
    for (int b = 0; b < num_seqs; b++)
        for (int t = query_start_loc[b]; t < query_start_loc[b + 1]; t++) token_seq[t] = b;
    int failed = 0;
    int tiled = 0; /* prefill chunks go to the tiled path, decodes stay per token */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    tiled = is_bf16 && (head_dim == 64 || head_dim == 128);
    if (tiled) failed = prefill_tiles_bf16(q, q_stride, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
                                           num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks,
                                           scale, sliding_window, num_threads);
#endif
#pragma omp parallel num_threads(num_threads)
    {
        float *qf = malloc(sizeof(float) * num_heads * head_dim);
        float *acc = malloc(sizeof(float) * num_heads * head_dim);
        float *row = malloc(sizeof(float) * num_kv_heads * head_dim);
        float *scores = NULL;
        bf16 *probs = NULL; /* every query head's probabilities, for the bf16 p . v */
        int64_t capacity = 0;
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < num_tokens; t++) {
            const int b = token_seq[t];
            if (tiled && query_start_loc[b + 1] - query_start_loc[b] > 1) continue;
            /* token t's context, itself included: the sequence's, less the query tokens after it */
            const int len = seq_lens[b] - (query_start_loc[b + 1] - 1 - t);
            const int first = sliding_window > 0 && len > sliding_window ? len - sliding_window : 0;
            if (len <= 0) continue; /* an empty (padding) sequence: its rows of out stay untouched */
            if ((int64_t)num_heads * (len - first) > capacity) {
                free(scores);
                free(probs);
                capacity = (int64_t)num_heads * (len - first);
                scores = malloc(sizeof(float) * capacity);
                probs = malloc(sizeof(bf16) * num_heads * (len - first + 2));
            }
            if (!qf || !acc || !row || !scores || !probs) {
#pragma omp atomic write
                failed = 1;
                capacity = 0;
                continue;
            }
            const int32_t *table = block_tables + (int64_t)b * max_blocks;
            const int64_t q_offset = (int64_t)t * q_stride, out_offset = (int64_t)t * num_heads * head_dim;
            /* the dtype and head_dim as literals, so each call specialises (the OpenMP body is outlined) */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
            if (is_bf16 && (head_dim == 64 || head_dim == 128)) {
                const bf16 *qb = (const bf16 *)q + q_offset;
                bf16 *ob = (bf16 *)out + out_offset;
                if (head_dim == 64)
                    attend_bf16(qb, k_cache, v_cache, ob, table, len, first, num_heads, num_kv_heads, block_size,
                                scale, scores, probs, 64);
                else
                    attend_bf16(qb, k_cache, v_cache, ob, table, len, first, num_heads, num_kv_heads, block_size,
                                scale, scores, probs, 128);
                continue;
            }
#endif
#if defined(VLEN)
            /* bf16 takes the vector path at the head dims the AVX512-BF16 one serves (64, 128), and
             * `attend` at the others, as with AVX512-BF16 (q . k in vdpbf16ps where it can). */
            if ((!is_bf16 || head_dim == 64 || head_dim == 128) &&
                attend_vec_any((const char *)q + q_offset * (is_bf16 ? 2 : 4), k_cache, v_cache,
                               (char *)out + out_offset * (is_bf16 ? 2 : 4), table, len, first, num_heads,
                               num_kv_heads, head_dim, block_size, scale, scores, is_bf16))
                continue;
#endif
            if (is_bf16)
                attend(q, k_cache, v_cache, out, table, len, first, q_offset, out_offset, num_heads, num_kv_heads,
                       head_dim, block_size, scale, qf, acc, row, scores, 1);
            else
                attend(q, k_cache, v_cache, out, table, len, first, q_offset, out_offset, num_heads, num_kv_heads,
                       head_dim, block_size, scale, qf, acc, row, scores, 0);
        }
        free(qf);
        free(acc);
        free(row);
        free(scores);
        free(probs);
    }
    free(token_seq);
    return failed ? -1 : 0;
}

/* This step's keys and values into their cache slots: row t of k (v) — every KV head of token t,
 * `row_bytes` contiguous bytes, rows `k_stride` (`v_stride`) bytes apart — goes to slot slots[t]
 * of k_cache (v_cache), rows of row_bytes; slot -1 marks padding. Any dtype: rows are copied. */
void store_kv(const char *k, int64_t k_stride, const char *v, int64_t v_stride, char *k_cache, char *v_cache,
              const int64_t *slots, int64_t rows, int64_t row_bytes, int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows, num_threads))
    for (int64_t t = 0; t < rows; t++) {
        if (slots[t] < 0) continue;
        memcpy(k_cache + slots[t] * row_bytes, k + t * k_stride, row_bytes);
        memcpy(v_cache + slots[t] * row_bytes, v + t * v_stride, row_bytes);
    }
}

#define ENTRY_POINT(SUFFIX, T, IS_BF16)                                                                      \
    int paged_attention_##SUFFIX(const T *q, int64_t q_stride, const T *k_cache, const T *v_cache, T *out,    \
                                 const int32_t *block_tables, const int32_t *seq_lens,                         \
                                 const int32_t *query_start_loc, int num_seqs, int num_heads, int num_kv_heads, \
                                 int head_dim, int block_size, int max_blocks, float scale, int sliding_window, \
                                 int num_threads) {                                                            \
        return paged_attention(q, q_stride, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,    \
                               num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks, scale,     \
                               sliding_window, num_threads, IS_BF16);                                          \
    }

ENTRY_POINT(f32, float, 0)
ENTRY_POINT(bf16, bf16, 1)
