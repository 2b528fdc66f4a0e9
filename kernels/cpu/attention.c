/* Paged decode attention on the CPU: one query token per sequence, read straight from the block
 * KV cache (no gathered copy of the context).
 *
 * Layouts (the contract of docs/architecture.md): q and out [num_seqs, num_heads, head_dim];
 * k_cache and v_cache [num_blocks, block_size, num_kv_heads, head_dim]; block_tables
 * [num_seqs, max_blocks] int32; seq_lens [num_seqs] int32 (context including the query token).
 * All contiguous. Each sequence is one work item, shared out over OpenMP threads.
 * Accumulation is in float32. Returns 0, or -1 if a scratch allocation failed.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Offset of context token t in a cache: block sizes are powers of two, so shifts, not divisions. */
static inline int64_t token_base(const int32_t *table, int t, int block_size, int64_t token_stride) {
    const int shift = __builtin_ctz((unsigned)block_size);
    return (((int64_t)table[t >> shift] << shift) + (t & (block_size - 1))) * token_stride;
}

/* Rows are fetched this many tokens ahead: blocks sit anywhere in the cache, so the hardware
 * prefetcher loses the stream at every block boundary. */
#define PREFETCH_DISTANCE 4

static inline void prefetch_row(const void *cache, const int32_t *table, int t, int block_size,
                                int64_t token_stride, int is_bf16) {
    const char *row = (const char *)cache + token_base(table, t, block_size, token_stride) * (is_bf16 ? 2 : 4);
    const int64_t bytes = token_stride * (is_bf16 ? 2 : 4);
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(row + offset);
}

/* One work item: every query head of sequence b. A context token's keys (or values) for all KV
 * heads are one contiguous row of the cache, so each token costs one streaming read. */
static inline void attend(const void *q, const void *k_cache, const void *v_cache, void *out,
                          const int32_t *table, int len, int first, int64_t q_offset, int num_heads,
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

    float inv_sum[num_heads]; /* softmax per query head; 1/sum is applied at the end */
    for (int hq = 0; hq < num_heads; hq++) {
        float *sh = scores + (int64_t)hq * n, top = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : top)
        for (int i = 0; i < n; i++) top = sh[i] > top ? sh[i] : top;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < n; i++) {
            sh[i] = exp_approx(sh[i] - top);
            sum += sh[i];
        }
        inv_sum[hq] = 1.0f / sum;
    }

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
            store(out, q_offset + (int64_t)hq * head_dim + d, acc[hq * head_dim + d] * inv_sum[hq], is_bf16);
}

static inline int decode_attention(const void *q, const void *k_cache, const void *v_cache, void *out,
                                   const int32_t *block_tables, const int32_t *seq_lens, int num_seqs,
                                   int num_heads, int num_kv_heads, int head_dim, int block_size,
                                   int max_blocks, float scale, int sliding_window, int num_threads,
                                   int is_bf16) {
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *qf = malloc(sizeof(float) * num_heads * head_dim);
        float *acc = malloc(sizeof(float) * num_heads * head_dim);
        float *row = malloc(sizeof(float) * num_kv_heads * head_dim);
        float *scores = NULL;
        int64_t capacity = 0;
#pragma omp for schedule(dynamic, 1)
        for (int b = 0; b < num_seqs; b++) {
            const int len = seq_lens[b];
            const int first = sliding_window > 0 && len > sliding_window ? len - sliding_window : 0;
            if (len <= 0) continue; /* an empty (padding) sequence: its rows of out stay untouched */
            if ((int64_t)num_heads * (len - first) > capacity) {
                free(scores);
                capacity = (int64_t)num_heads * (len - first);
                scores = malloc(sizeof(float) * capacity);
            }
            if (!qf || !acc || !row || !scores) {
#pragma omp atomic write
                failed = 1;
                capacity = 0;
                continue;
            }
            /* the dtype as a literal, so each call specialises (the OpenMP body is outlined) */
            const int32_t *table = block_tables + (int64_t)b * max_blocks;
            const int64_t q_offset = (int64_t)b * num_heads * head_dim;
            if (is_bf16)
                attend(q, k_cache, v_cache, out, table, len, first, q_offset, num_heads, num_kv_heads, head_dim,
                       block_size, scale, qf, acc, row, scores, 1);
            else
                attend(q, k_cache, v_cache, out, table, len, first, q_offset, num_heads, num_kv_heads, head_dim,
                       block_size, scale, qf, acc, row, scores, 0);
        }
        free(qf);
        free(acc);
        free(row);
        free(scores);
    }
    return failed ? -1 : 0;
}

#define ENTRY_POINT(SUFFIX, T, IS_BF16)                                                                   \
    int decode_attention_##SUFFIX(const T *q, const T *k_cache, const T *v_cache, T *out,                 \
                                  const int32_t *block_tables, const int32_t *seq_lens, int num_seqs,     \
                                  int num_heads, int num_kv_heads, int head_dim, int block_size,          \
                                  int max_blocks, float scale, int sliding_window, int num_threads) {     \
        return decode_attention(q, k_cache, v_cache, out, block_tables, seq_lens, num_seqs, num_heads,    \
                                num_kv_heads, head_dim, block_size, max_blocks, scale, sliding_window,    \
                                num_threads, IS_BF16);                                                    \
    }

ENTRY_POINT(f32, float, 0)
ENTRY_POINT(bf16, bf16, 1)
