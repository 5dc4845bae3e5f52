/* Paged attention for short queries (decode, speculative verification) on CPU.
 *
 * Reads K/V straight from the block-paged cache: the torch path has to gather every
 * request's context into a padded tensor first, which writes and re-reads the whole KV
 * working set each layer. Scores and softmax are computed in fp32.
 *
 * Layouts (element strides given by the caller):
 *   q      [num_tokens, heads, d]          row stride q_stride (elements per token)
 *   cache  [num_blocks, kv_heads, block_size, d]   (see kv_offset in common.h)
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


/* Causal softmax of each score row (stride cs) in place: row r (query r / group) covers
 * positions 0 .. first_limit + r / group; later positions get probability 0. */
static void softmax_rows(float *scores, int cs, int rows, int group, int first_limit, int ctx) {
    for (int r = 0; r < rows; r++) {
        const int len = first_limit + r / group + 1;
        float *sr = scores + (size_t)r * cs, m = sr[0];
#pragma omp simd reduction(max:m)
        for (int t = 0; t < len; t++) m = sr[t] > m ? sr[t] : m;
#pragma omp simd
        for (int t = 0; t < len; t++) sr[t] -= m;
        const float inv = 1.f / exp_inplace_sum(sr, len);
#pragma omp simd
        for (int t = 0; t < len; t++) sr[t] *= inv;
        for (int t = len; t < ctx; t++) sr[t] = 0.f;
    }
}

static void store_out(char *out, int64_t out_stride, int64_t q0, int n, int group, int kvh, int d,
                      const float *acc, int is_bf16) {
    const size_t es = is_bf16 ? 2 : 4;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < group; j++)
            store_row(out + ((q0 + i) * out_stride + (int64_t)(kvh * group + j) * d) * es,
                      acc + (size_t)(i * group + j) * d, d, is_bf16);
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* Fast path for bf16 with AVX512-BF16: q.k with vdpbf16ps straight from the bf16 cache (no
 * conversion), 16 tokens' partial dot products folded into one vector of 16 scores by a
 * transpose-add butterfly, and the probability-weighted V sum kept in registers. */

/* lane i of the result = sum of all lanes of v[i] */
static inline __m512 sum16(__m512 v[16]) {
    __m512 w[8], u[4];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44), _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
    /* u[i], 128-bit lane L: partial sums over lane L of v[4i .. 4i+3] */
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

/* Hardware prefetchers lose the stream at every block boundary (blocks are scattered), so
 * ask for the next 16 tokens' rows of this kv head one chunk ahead. */
static inline void prefetch_rows(const uint16_t *cache, int kv_heads, const int64_t *blocks, int kvh, int d,
                                 int block_size, int t0, int ctx) {
    if (t0 >= ctx) return;
    const int nt = ctx - t0 < 16 ? ctx - t0 : 16;
    const int64_t base = blocks[t0 / block_size] * block_size + t0 % block_size;
    for (int tt = 0; tt < nt; tt++) {
        const char *p = (const char *)(cache + kv_offset(base + tt, kvh, kv_heads, block_size, d));
        for (int off = 0; off < d * 2; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
    }
}

/* scores[r][t] = scale * q_r . k_t for t < ctx, rows r of one (request, kv head);
 * scores has row stride cs (ctx rounded up to 16). block_size is a multiple of 16. */
static void scores_bf16(const uint16_t *const *q_rows, int rows, const uint16_t *k_cache, int kv_heads,
                        const int64_t *blocks, int kvh, int d, int block_size, int ctx, float scale, int cs,
                        float *scores) {
    const int nv = d / 32;
    for (int t0 = 0; t0 < ctx; t0 += 16) {
        const int nt = ctx - t0 < 16 ? ctx - t0 : 16;
        const int64_t base = blocks[t0 / block_size] * block_size + t0 % block_size;
        prefetch_rows(k_cache, kv_heads, blocks, kvh, d, block_size, t0 + 16, ctx);
        for (int r = 0; r < rows; r++) {
            __m512 part[16];
            for (int tt = 0; tt < 16; tt++) {
                __m512 acc = _mm512_setzero_ps();
                if (tt < nt) {
                    const uint16_t *kp = k_cache + kv_offset(base + tt, kvh, kv_heads, block_size, d);
                    for (int v = 0; v < nv; v++)
                        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q_rows[r] + 32 * v),
                                               (__m512bh)_mm512_loadu_si512(kp + 32 * v));
                }
                part[tt] = acc;
            }
            _mm512_storeu_ps(scores + (size_t)r * cs + t0, _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale)));
        }
    }
}

static inline __attribute__((always_inline)) void load_bf16x32(const uint16_t *p, __m512 *lo, __m512 *hi) {
    const __m512i raw = _mm512_loadu_si512(p);
    *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
    *hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
}

/* acc[r] = sum_t p[r][t] * v_t for R rows at once, accumulators in registers (NV = d / 16). */
static inline __attribute__((always_inline)) void values_rows(const float *p, int cs, const uint16_t *v_cache,
                                                              int kv_heads, const int64_t *blocks, int kvh,
                                                              int block_size, int len, const int NV, const int R,
                                                              float *acc) {
    __m512 a[4][8];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) a[r][v] = _mm512_setzero_ps();
    for (int t = 0; t < len; t++) {
        if (t % 16 == 0) prefetch_rows(v_cache, kv_heads, blocks, kvh, NV * 16, block_size, t + 16, len);
        const uint16_t *vp = v_cache + kv_offset(blocks[t / block_size] * block_size + t % block_size, kvh, kv_heads,
                                                           block_size, NV * 16);
        __m512 vv[8];
        for (int v = 0; v < NV; v += 2) load_bf16x32(vp + 16 * v, &vv[v], &vv[v + 1]);
        for (int r = 0; r < R; r++) {
            const __m512 pb = _mm512_set1_ps(p[(size_t)r * cs + t]);
            for (int v = 0; v < NV; v++) a[r][v] = _mm512_fmadd_ps(pb, vv[v], a[r][v]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(acc + (size_t)r * NV * 16 + 16 * v, a[r][v]);
}

static void values_bf16(const float *p, int cs, const uint16_t *v_cache, int kv_heads,
                        const int64_t *blocks, int kvh, int block_size, int d, int rows, int group,
                        int first_limit, float *acc) {
    const int nv = d / 16, chunk = nv <= 4 ? 4 : 2;
    for (int r0 = 0; r0 < rows; r0 += chunk) {
        const int rc = rows - r0 < chunk ? rows - r0 : chunk;
        /* the chunk's last row sees the most positions; the others have p = 0 past theirs */
        const int len = first_limit + (r0 + rc - 1) / group + 1;
        const float *pr = p + (size_t)r0 * cs;
        float *ar = acc + (size_t)r0 * d;
#define VALUES_CASE(NV_, R_) values_rows(pr, cs, v_cache, kv_heads, blocks, kvh, block_size, len, NV_, R_, ar)
        if (nv == 4) {
            if (rc == 4) VALUES_CASE(4, 4); else if (rc == 3) VALUES_CASE(4, 3);
            else if (rc == 2) VALUES_CASE(4, 2); else VALUES_CASE(4, 1);
        } else if (nv == 8) {
            if (rc == 2) VALUES_CASE(8, 2); else VALUES_CASE(8, 1);
        } else { /* d == 32 */
            if (rc == 4) VALUES_CASE(2, 4); else if (rc == 3) VALUES_CASE(2, 3);
            else if (rc == 2) VALUES_CASE(2, 2); else VALUES_CASE(2, 1);
        }
#undef VALUES_CASE
    }
}
#define HAVE_BF16_FAST_PATH 1
#endif

/* One (request, kv head): `rows` = group * n query rows, ordered (query i, head j). */
static void attend_one(const char *q, int64_t q_stride, const char *k_cache, const char *v_cache,
                       int kv_heads, char *out, int64_t out_stride, int64_t q0, int n, int ctx,
                       const int64_t *blocks, int kvh, int group, int d, int block_size, float scale,
                       int is_bf16, float *restrict qf, float *restrict acc, float *restrict scores,
                       float *restrict tile) {
    const size_t es = is_bf16 ? 2 : 4;
    const int rows = group * n, first_limit = ctx - n; /* query i sees 0 .. first_limit + i */
#ifdef HAVE_BF16_FAST_PATH
    if (is_bf16 && (d == 32 || d == 64 || d == 128) && block_size % 16 == 0) {
        const int cs = (ctx + 15) / 16 * 16;
        const uint16_t *q_rows[rows];
        for (int i = 0; i < n; i++)
            for (int j = 0; j < group; j++)
                q_rows[i * group + j] = (const uint16_t *)q + (q0 + i) * q_stride + (int64_t)(kvh * group + j) * d;
        scores_bf16(q_rows, rows, (const uint16_t *)k_cache, kv_heads, blocks, kvh, d, block_size, ctx, scale,
                    cs, scores);
        softmax_rows(scores, cs, rows, group, first_limit, ctx);
        values_bf16(scores, cs, (const uint16_t *)v_cache, kv_heads, blocks, kvh, block_size, d, rows, group,
                    first_limit, acc);
        store_out(out, out_stride, q0, n, group, kvh, d, acc, is_bf16);
        return;
    }
#endif
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
            load_row(tile, k_cache + kv_offset(base + tt, kvh, kv_heads, block_size, d) * es, d, is_bf16);
            for (int r = 0; r < rows; r++) scores[(size_t)r * ctx + t0 + tt] = dot(qf + (size_t)r * d, tile, d);
        }
    }
    softmax_rows(scores, ctx, rows, group, first_limit, ctx);
    memset(acc, 0, sizeof(float) * (size_t)rows * d);
    for (int t0 = 0; t0 < ctx; t0 += block_size) {
        const int nt = ctx - t0 < block_size ? ctx - t0 : block_size;
        const int64_t base = blocks[t0 / block_size] * block_size;
        for (int tt = 0; tt < nt; tt++)
            load_row(tile + tt * d, v_cache + kv_offset(base + tt, kvh, kv_heads, block_size, d) * es, d, is_bf16);
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
    store_out(out, out_stride, q0, n, group, kvh, d, acc, is_bf16);
}

/* Returns 0, or -1 when the arguments are out of the supported range or scratch memory
 * could not be allocated. */
int paged_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                    void *out, int64_t out_stride, int num_requests,
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
        float *scores = malloc(sizeof(float) * (size_t)group * n * ((ctx + 15) / 16 * 16));
        float *tile = malloc(sizeof(float) * (size_t)d * 64);
        if (!qf || !acc || !scores || !tile)
            failed = 1;
        else
            attend_one(q, q_stride, k_cache, v_cache, kv_heads, out, out_stride, query_start[b], n, ctx,
                       block_table + b * max_blocks, kvh, group, d, block_size, scale, is_bf16, qf, acc,
                       scores, tile);
        free(qf); free(acc); free(scores); free(tile);
    }
    return failed ? -1 : 0;
}
