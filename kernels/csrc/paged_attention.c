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
 * Query i of request b sees context positions 0 .. context_len - query_len + i; with a sliding
 * window (window > 0) only the last `window` of them: the softmax gives the positions before
 * it probability 0, and the K/V passes start at the first one any query of the task sees
 * (rounded down to 16 tokens, or to a block on the generic path), so a long context costs a
 * windowed layer only its window.
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
 * positions 0 .. first_limit + r / group, or with window > 0 only the last `window` of them;
 * other positions get probability 0. */
static void softmax_rows(float *scores, int cs, int rows, int group, int first_limit, int ctx, int window,
                         float softcap) {
    for (int r = 0; r < rows; r++) {
        const int len = first_limit + r / group + 1;
        const int start = window > 0 && len > window ? len - window : 0;
        float *sr = scores + (size_t)r * cs;
        for (int t = 0; t < start; t++) sr[t] = 0.f;
        sr += start;
        const int n = len - start;
        if (softcap > 0.f) /* Gemma 2: scores squashed into (-softcap, softcap) before the softmax */
            softcap_inplace(sr, n, softcap);
        float m = sr[0];
#pragma omp simd reduction(max:m)
        for (int t = 0; t < n; t++) m = sr[t] > m ? sr[t] : m;
#pragma omp simd
        for (int t = 0; t < n; t++) sr[t] -= m;
        const float inv = 1.f / exp_inplace_sum(sr, n);
#pragma omp simd
        for (int t = 0; t < n; t++) sr[t] *= inv;
        for (int t = n; t < ctx - start; t++) sr[t] = 0.f;
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
                        float *scores, int begin) {
    const int nv = d / 32;
    for (int t0 = begin; t0 < ctx; t0 += 16) {
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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* The same scores on AMX tiles, for up to 16 query rows: per chunk of 16 tokens the K rows
 * are the A operand as they lie in the cache (16 rows x 32 dims per tile, row stride d) and
 * the query rows, transposed into pairs of dims once per task, the B operand; the 16 x rows
 * result is scattered into the row-major score rows. About 4x fewer instructions than the
 * dot-product path, which is what bounds it while the K rows stream in. */
/* Tiles: 0, 1 scores (alternate chunks); 2, 7 K rows; 3-6 query pairs for d/32 slices (3 for d = 96). */
static void configure_scores(int rows) {
    amx_tile_config cfg = {0};
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = (t == 2 || t == 7) ? 64 : (uint16_t)(4 * rows);
    }
    _tile_loadconfig(&cfg);
}

#define SCORE_CHUNK(C, kp, nv)                                                            \
    do {                                                                                  \
        _tile_zero(C);                                                                    \
        _tile_loadd(2, (kp), stride);                                                     \
        _tile_dpbf16ps(C, 2, 3);                                                          \
        if ((nv) > 1) { _tile_loadd(7, (kp) + 32, stride); _tile_dpbf16ps(C, 7, 4); }     \
        if ((nv) > 2) { _tile_loadd(2, (kp) + 64, stride); _tile_dpbf16ps(C, 2, 5); }     \
        if ((nv) > 3) { _tile_loadd(7, (kp) + 96, stride); _tile_dpbf16ps(C, 7, 6); }     \
    } while (0)

/* Dims dim0 .. dim0 + 128 (or d) of the product; with dim0 > 0 the scores are added to the
 * ones an earlier call stored (four query tiles cover 128 dims, so d = 256 takes two calls). */
static void scores_amx(const uint16_t *const *q_rows, int rows, const uint16_t *k_cache, int kv_heads,
                       const int64_t *blocks, int kvh, int d, int block_size, int ctx, float scale, int cs,
                       float *scores, int dim0, int begin) {
    const int nv = d - dim0 < 128 ? (d - dim0) / 32 : 4;
    const int64_t stride = (int64_t)d * 2;
    uint32_t qt[4][16][16] __attribute__((aligned(64)));
    for (int v = 0; v < nv; v++)
        for (int p = 0; p < 16; p++)
            for (int r = 0; r < rows; r++) qt[v][p][r] = ((const uint32_t *)(q_rows[r] + dim0))[16 * v + p];
    _tile_loadd(3, qt[0], 64);
    if (nv > 1) _tile_loadd(4, qt[1], 64);
    if (nv > 2) _tile_loadd(5, qt[2], 64);
    if (nv > 3) _tile_loadd(6, qt[3], 64);
    float st[2][16][16] __attribute__((aligned(64)));
    for (int t0 = begin; t0 < ctx; t0 += 32) {
        /* two chunks in flight, one per score tile */
        const int nt0 = ctx - t0 < 16 ? ctx - t0 : 16, t1 = t0 + 16, nt1 = ctx - t1 < 16 ? ctx - t1 : 16;
        const uint16_t *k0 = k_cache + kv_offset(blocks[t0 / block_size] * block_size + t0 % block_size, kvh,
                                                 kv_heads, block_size, d) + dim0;
        SCORE_CHUNK(0, k0, nv);
        if (nt1 > 0) {
            const uint16_t *k1 = k_cache + kv_offset(blocks[t1 / block_size] * block_size + t1 % block_size, kvh,
                                                     kv_heads, block_size, d) + dim0;
            SCORE_CHUNK(1, k1, nv);
        }
        _tile_stored(0, st[0], 64);
        if (nt1 > 0) _tile_stored(1, st[1], 64);
        for (int r = 0; r < rows; r++) {
            float *sr = scores + (size_t)r * cs + t0;
            if (dim0 == 0) {
                for (int tt = 0; tt < nt0; tt++) sr[tt] = st[0][tt][r] * scale;
                for (int tt = 0; tt < nt1; tt++) sr[16 + tt] = st[1][tt][r] * scale;
            } else {
                for (int tt = 0; tt < nt0; tt++) sr[tt] += st[0][tt][r] * scale;
                for (int tt = 0; tt < nt1; tt++) sr[16 + tt] += st[1][tt][r] * scale;
            }
        }
    }
}
#undef SCORE_CHUNK

/* Tiles: 0-3 output columns (16 dims each), 4/5 probabilities (high / low bf16 part), 6/7 V. */
static void configure_values(int rows) {
    amx_tile_config cfg = {0};
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = t >= 6 ? 16 : (uint8_t)rows;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* acc[r][0..d) = sum over t < len of p[r][t] * v_t, for rows <= 16, on AMX. Each probability
 * is split into two bf16 numbers, hi + lo, so the products keep about 16 bits of it (fp32
 * accumulation, like the AVX-512 path, to within ~1e-5 relative). V rows of each pair of
 * tokens are interleaved into AMX's operand order on the fly; positions at or past len are
 * zeros (never read from the cache), so stale blocks cannot leak in even as NaN * 0. */
static void values_amx(const float *p, int cs, const uint16_t *v_cache, int kv_heads, const int64_t *blocks,
                       int kvh, int block_size, int d, int rows, int len, float *acc, int begin) {
    const __m512i idx_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
    uint16_t ahi[16][32] __attribute__((aligned(64))), alo[16][32] __attribute__((aligned(64)));
    uint16_t vb[4][16][32] __attribute__((aligned(64)));
    configure_values(rows);
    for (int dh = 0; dh < d; dh += 64) {
        const int width = d - dh < 64 ? d - dh : 64, nc = width / 16;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int t0 = begin; t0 < len; t0 += 32) {
            const int nt = len - t0 < 32 ? len - t0 : 32;
            const __mmask16 m0 = nt >= 16 ? 0xFFFF : (__mmask16)((1u << nt) - 1);
            const __mmask16 m1 = nt <= 16 ? 0 : nt >= 32 ? 0xFFFF : (__mmask16)((1u << (nt - 16)) - 1);
            for (int r = 0; r < rows; r++) {
                const float *pr = p + (size_t)r * cs + t0;
                const __m512 p0 = _mm512_maskz_loadu_ps(m0, pr), p1 = _mm512_maskz_loadu_ps(m1, pr + 16);
                const __m512bh hi = _mm512_cvtne2ps_pbh(p1, p0);
                const __m512i hb = (__m512i)hi;
                const __m512 h0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hb)), 16));
                const __m512 h1 = _mm512_castsi512_ps(
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hb, 1)), 16));
                _mm512_store_si512(ahi[r], hb);
                _mm512_store_si512(alo[r], (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(p1, h1), _mm512_sub_ps(p0, h0)));
            }
            _tile_loadd(4, ahi, 64);
            _tile_loadd(5, alo, 64);
            /* 16 tokens never straddle a block (block_size is a multiple of 16): one address each */
            const uint16_t *vbase[2];
            for (int h = 0; h < 2; h++) {
                const int t = t0 + 16 * h < len ? t0 + 16 * h : t0;
                vbase[h] = v_cache + kv_offset(blocks[t / block_size] * block_size + t % block_size, kvh, kv_heads,
                                               block_size, d) + dh;
            }
            for (int pp = 0; pp < 16; pp++) {
                __m512i a[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()}, b[2] = {a[0], a[1]};
                for (int k = 0; k < 2; k++) {
                    const int tt = 2 * pp + k;
                    if (t0 + tt >= len) break;
                    const uint16_t *vp = vbase[tt / 16] + (tt % 16) * d;
                    __m512i *dst = k ? b : a;
                    dst[0] = _mm512_loadu_si512(vp);
                    if (width > 32) dst[1] = _mm512_loadu_si512(vp + 32);
                }
                _mm512_store_si512(vb[0][pp], _mm512_permutex2var_epi16(a[0], idx_lo, b[0]));
                _mm512_store_si512(vb[1][pp], _mm512_permutex2var_epi16(a[0], idx_hi, b[0]));
                if (width > 32) {
                    _mm512_store_si512(vb[2][pp], _mm512_permutex2var_epi16(a[1], idx_lo, b[1]));
                    _mm512_store_si512(vb[3][pp], _mm512_permutex2var_epi16(a[1], idx_hi, b[1]));
                }
            }
/* output tile C += (high + low probabilities) x V columns in tile B (tile numbers are literals) */
#define VALUES_DP(C, B, src) do { _tile_loadd(B, src, 64); _tile_dpbf16ps(C, 4, B); _tile_dpbf16ps(C, 5, B); } while (0)
            VALUES_DP(0, 6, vb[0]);
            VALUES_DP(1, 7, vb[1]);
            if (nc > 2) {
                VALUES_DP(2, 6, vb[2]);
                VALUES_DP(3, 7, vb[3]);
            }
#undef VALUES_DP
        }
        const int64_t stride = (int64_t)d * 4;
        _tile_stored(0, acc + dh, stride);
        _tile_stored(1, acc + dh + 16, stride);
        if (nc > 2) {
            _tile_stored(2, acc + dh + 32, stride);
            _tile_stored(3, acc + dh + 48, stride);
        }
    }
}
#define HAVE_AMX_ATTENTION 1
#endif

static inline __attribute__((always_inline)) void load_bf16x32(const uint16_t *p, __m512 *lo, __m512 *hi) {
    const __m512i raw = _mm512_loadu_si512(p);
    *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
    *hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
}

/* acc[r] = sum_t p[r][t] * v_t for R rows at once, accumulators in registers (NV = d / 16). */
static inline __attribute__((always_inline)) void values_rows(const float *p, int cs, const uint16_t *v_cache,
                                                              int kv_heads, const int64_t *blocks, int kvh,
                                                              int block_size, int len, const int NV, const int R,
                                                              float *acc, int begin) {
    __m512 a[4][8];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) a[r][v] = _mm512_setzero_ps();
    for (int t = begin; t < len; t++) {
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
                        int first_limit, float *acc, int begin) {
    const int nv = d / 16, chunk = nv <= 4 ? 4 : 2;
    for (int r0 = 0; r0 < rows; r0 += chunk) {
        const int rc = rows - r0 < chunk ? rows - r0 : chunk;
        /* the chunk's last row sees the most positions; the others have p = 0 past theirs */
        const int len = first_limit + (r0 + rc - 1) / group + 1;
        const float *pr = p + (size_t)r0 * cs;
        float *ar = acc + (size_t)r0 * d;
#define VALUES_CASE(NV_, R_) values_rows(pr, cs, v_cache, kv_heads, blocks, kvh, block_size, len, NV_, R_, ar, begin)
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
                       float *restrict tile, int use_amx, int window, float softcap) {
    const size_t es = is_bf16 ? 2 : 4;
    const int rows = group * n, first_limit = ctx - n; /* query i sees 0 .. first_limit + i */
    /* the first position any row sees: query 0's window start (later queries' start later) */
    const int begin = window > 0 && first_limit + 1 > window ? first_limit + 1 - window : 0;
#ifdef HAVE_BF16_FAST_PATH
    /* d = 96 (Phi-3-mini) and 256 (Gemma 3) only on AMX: the AVX-512 values path has cases
     * for 2, 4 and 8 vectors per row, which it keeps in registers */
#ifdef HAVE_AMX_ATTENTION
    const int amx_only_d = (d == 96 || d == 256) && use_amx;
#else
    const int amx_only_d = 0;
#endif
    if (is_bf16 && (d == 32 || d == 64 || d == 128 || amx_only_d) && block_size % 16 == 0) {
        const int cs = (ctx + 15) / 16 * 16, begin16 = begin / 16 * 16;
        const uint16_t *q_rows[rows];
        for (int i = 0; i < n; i++)
            for (int j = 0; j < group; j++)
                q_rows[i * group + j] = (const uint16_t *)q + (q0 + i) * q_stride + (int64_t)(kvh * group + j) * d;
#ifdef HAVE_AMX_ATTENTION
        if (use_amx) {
            /* up to 16 query rows per tile pass; each row's result does not depend on the
             * others, so a verified token gets exactly what decoding it alone would */
            for (int r0 = 0; r0 < rows; r0 += 16) {
                const int rc = rows - r0 < 16 ? rows - r0 : 16;
                configure_scores(rc);
                for (int dim0 = 0; dim0 < d; dim0 += 128)
                    scores_amx(q_rows + r0, rc, (const uint16_t *)k_cache, kv_heads, blocks, kvh, d, block_size,
                               ctx, scale, cs, scores + (size_t)r0 * cs, dim0, begin16);
            }
            softmax_rows(scores, cs, rows, group, first_limit, ctx, window, softcap);
            for (int r0 = 0; r0 < rows; r0 += 16) {
                const int rc = rows - r0 < 16 ? rows - r0 : 16;
                values_amx(scores + (size_t)r0 * cs, cs, (const uint16_t *)v_cache, kv_heads, blocks, kvh, block_size,
                           d, rc, ctx, acc + (size_t)r0 * d, begin16);
            }
        } else
#endif
        {
            scores_bf16(q_rows, rows, (const uint16_t *)k_cache, kv_heads, blocks, kvh, d, block_size, ctx, scale,
                        cs, scores, begin16);
            softmax_rows(scores, cs, rows, group, first_limit, ctx, window, softcap);
            values_bf16(scores, cs, (const uint16_t *)v_cache, kv_heads, blocks, kvh, block_size, d, rows, group,
                        first_limit, acc, begin16);
        }
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
    const int first_block = begin / block_size * block_size;
    for (int t0 = first_block; t0 < ctx; t0 += block_size) {
        const int nt = ctx - t0 < block_size ? ctx - t0 : block_size;
        const int64_t base = blocks[t0 / block_size] * block_size;
        for (int tt = 0; tt < nt; tt++) {
            load_row(tile, k_cache + kv_offset(base + tt, kvh, kv_heads, block_size, d) * es, d, is_bf16);
            for (int r = 0; r < rows; r++) scores[(size_t)r * ctx + t0 + tt] = dot(qf + (size_t)r * d, tile, d);
        }
    }
    softmax_rows(scores, ctx, rows, group, first_limit, ctx, window, softcap);
    memset(acc, 0, sizeof(float) * (size_t)rows * d);
    for (int t0 = first_block; t0 < ctx; t0 += block_size) {
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
                    int block_size, float scale, int is_bf16, int num_threads, int window, float softcap) {
    if (d > 256 || block_size > 64 || heads % kv_heads) return -1;
    const int group = heads / kv_heads;
    int failed = 0;
    /* AMX tile state is per thread: each configures it per task and releases it at the end. */
    const int use_amx = is_bf16 && amx_init() == 0;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(dynamic)
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
                       scores, tile, use_amx, window, softcap);
        free(qf); free(acc); free(scores); free(tile);
    }
#ifdef HAVE_AMX_ATTENTION
    if (use_amx) _tile_release();
#endif
    }
    return failed ? -1 : 0;
}
