/* Paged attention for short queries (decode, speculative verification) on CPU.
 *
 * Reads K/V straight from the block-paged cache: the torch path has to gather every
 * request's context into a padded tensor first, which writes and re-reads the whole KV
 * working set each layer. Scores and softmax are computed in fp32.
 *
 * Layouts (element strides given by the caller):
 *   q      [num_tokens, heads, d]          row stride q_stride (elements per token)
 *   cache  [num_slots, kv_heads, d]        row stride slot_stride; slot = block*block_size+offset
 *   out    [num_tokens, heads, d]          row stride out_stride
 * Request b owns query tokens query_start[b] .. +query_len[b]; its context (cached tokens and
 * the new ones, already written) is context_len[b] tokens long, mapped by block_table[b, :].
 * Query i of request b sees context positions 0 .. context_len - query_len + i.
 * Query head h reads KV head h / (heads / kv_heads).
 * Element type: bf16 (is_bf16 = 1) or fp32 for q, caches and out alike.
 */
#include <stdlib.h>

#include "common.h"

/* dot(a, b) over n floats; AVX-512 when built for it, else left to the auto-vectoriser. */
static inline float dot(const float *restrict a, const float *restrict b, int n) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    int x = 0;
    for (; x + 16 <= n; x += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + x), _mm512_loadu_ps(b + x), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; x < n; x++) s += a[x] * b[x];
    return s;
#else
    float s = 0.f;
#pragma omp simd reduction(+:s)
    for (int x = 0; x < n; x++) s += a[x] * b[x];
    return s;
#endif
}

/* One (request, kv head): `rows` = group * n query rows, ordered (query i, head j). */
static void attend_one(const char *q, int64_t q_stride, const char *k_cache, const char *v_cache,
                       int64_t slot_stride, char *out, int64_t out_stride, int64_t q0, int n, int ctx,
                       const int64_t *blocks, int kvh, int group, int d, int block_size, float scale,
                       int is_bf16, float *restrict qf, float *restrict acc, float *restrict scores,
                       float *restrict tile) {
    const size_t es = is_bf16 ? 2 : 4;
    const int rows = group * n, first_limit = ctx - n; /* query i sees 0 .. first_limit + i */
    for (int i = 0; i < n; i++)
        for (int j = 0; j < group; j++) {
            float *dst = qf + (size_t)(i * group + j) * d;
            load_row(dst, q + ((q0 + i) * q_stride + (int64_t)(kvh * group + j) * d) * es, d, is_bf16);
            for (int x = 0; x < d; x++) dst[x] *= scale;
        }
    /* Scores: each K row is converted once and dotted with every query row of the group. */
    for (int t0 = 0; t0 < ctx; t0 += block_size) {
        const int nt = ctx - t0 < block_size ? ctx - t0 : block_size;
        const int64_t base = blocks[t0 / block_size] * block_size;
        for (int tt = 0; tt < nt; tt++) {
            load_row(tile, k_cache + ((base + tt) * slot_stride + (int64_t)kvh * d) * es, d, is_bf16);
            for (int r = 0; r < rows; r++) scores[(size_t)r * ctx + t0 + tt] = dot(qf + (size_t)r * d, tile, d);
        }
    }
    for (int r = 0; r < rows; r++) {
        const int len = first_limit + r / group + 1;
        float *sr = scores + (size_t)r * ctx, m = sr[0];
#pragma omp simd reduction(max:m)
        for (int t = 0; t < len; t++) m = sr[t] > m ? sr[t] : m;
#pragma omp simd
        for (int t = 0; t < len; t++) sr[t] -= m;
        const float inv = 1.f / exp_inplace_sum(sr, len);
#pragma omp simd
        for (int t = 0; t < len; t++) sr[t] *= inv;
        for (int t = len; t < ctx; t++) sr[t] = 0.f;
    }
    memset(acc, 0, sizeof(float) * (size_t)rows * d);
    for (int t0 = 0; t0 < ctx; t0 += block_size) {
        const int nt = ctx - t0 < block_size ? ctx - t0 : block_size;
        const int64_t base = blocks[t0 / block_size] * block_size;
        for (int tt = 0; tt < nt; tt++)
            load_row(tile + tt * d, v_cache + ((base + tt) * slot_stride + (int64_t)kvh * d) * es, d, is_bf16);
        for (int r = 0; r < rows; r++) {
            const float *pr = scores + (size_t)r * ctx + t0;
            float *ar = acc + (size_t)r * d;
            for (int tt = 0; tt < nt; tt++) {
                const float p = pr[tt];
                const float *vx = tile + tt * d;
#pragma omp simd
                for (int x = 0; x < d; x++) ar[x] += p * vx[x];
            }
        }
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < group; j++)
            store_row(out + ((q0 + i) * out_stride + (int64_t)(kvh * group + j) * d) * es,
                      acc + (size_t)(i * group + j) * d, d, is_bf16);
}

/* Returns 0, or -1 when the arguments are out of the supported range or scratch memory
 * could not be allocated. */
int paged_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                    int64_t slot_stride, void *out, int64_t out_stride, int num_requests,
                    const int64_t *query_start, const int64_t *query_len, const int64_t *context_len,
                    const int64_t *block_table, int64_t max_blocks, int heads, int kv_heads, int d,
                    int block_size, float scale, int is_bf16, int num_threads) {
    if (d > 256 || block_size > 64 || heads % kv_heads) return -1;
    const int group = heads / kv_heads;
    int failed = 0;
#pragma omp parallel for schedule(dynamic) num_threads(num_threads)
    for (int task = 0; task < num_requests * kv_heads; task++) {
        const int b = task / kv_heads, kvh = task % kv_heads;
        const int n = (int)query_len[b], ctx = (int)context_len[b];
        float *qf = malloc(sizeof(float) * (size_t)group * n * d);
        float *acc = malloc(sizeof(float) * (size_t)group * n * d);
        float *scores = malloc(sizeof(float) * (size_t)group * n * ctx);
        float *tile = malloc(sizeof(float) * (size_t)d * 64);
        if (!qf || !acc || !scores || !tile)
            failed = 1;
        else
            attend_one(q, q_stride, k_cache, v_cache, slot_stride, out, out_stride, query_start[b], n, ctx,
                       block_table + b * max_blocks, kvh, group, d, block_size, scale, is_bf16, qf, acc,
                       scores, tile);
        free(qf); free(acc); free(scores); free(tile);
    }
    return failed ? -1 : 0;
}
