/* Segmented LoRA on CPU: y[t] += (x[t] . A[slot]^T) . B[slot]^T for every token of every
 * adapter segment, for all of a projection's targeted modules in one call (`lora_add`, at
 * the end; the torch path needs about eight ops per module, whose dispatch cost dominated
 * decode steps). Reads each token's adapter rows directly from the pool's stacks; accumulates
 * in fp32; rounds lora_A's and lora_B's outputs to the weights' dtype as PEFT does, and y
 * once after the add.
 *
 *   x  [T, in]          row stride x_stride
 *   y  [T, *]           row stride y_stride; module m writes columns y_col .. y_col + out
 *   A  [slots, R, in]   element (s, r, k) at s*a_slot_stride + r*in + k
 *   B  [slots, out, R]  element (s, o, r) at s*b_slot_stride + o*b_row_stride + r
 * Segment i covers rows seg_start[i] .. seg_start[i] + seg_len[i] with pool slot seg_slot[i].
 * Only the first `rank` (<= R) rank positions are read: the step's largest adapter rank.
 * Segments whose adapters have row terms (DoRA, lora_bias) end as (y + delta) * s + t on the
 * modules' columns, applied in the same pass (struct row_terms, lora.h).
 *
 * Two implementations: AMX tiles (bf16, any segment length: lora_amx.c), and here, per module,
 * AVX-512 / plain loops for fp32, CPUs without AMX and shapes the tiles do not fit (segments
 * of at most MAX_SEG_ROWS rows: the caller sends longer ones to torch matmuls).
 */
#include <stdlib.h>

#include "common.h"
#include "lora.h"

#define MAX_RANK 256
#define MAX_IN 32768

static inline float dot_f32(const float *restrict a, const float *restrict b, int n) {
    float s = 0.f;
#pragma omp simd reduction(+:s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Without AMX, segments are processed whole: each adapter row is converted once per segment
 * and used for all of the segment's tokens (up to MAX_SEG_ROWS). Phase 1 spreads (segment,
 * rank row) pairs over the threads, phase 2 (segment, 64 outputs) pairs. */
#define MAX_SEG_ROWS 64

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_BF16_LORA 1
/* bf16 paths without AMX: no conversion passes, no scalar transposes. */


/* h[t][r] = round(x_t . A_r), for in % 32 == 0: vdpbf16ps straight from the bf16 rows. */
static inline float shrink_dot_bf16(const uint16_t *x, const uint16_t *a, int in) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= in; k += 64) {
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(a + k));
        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(x + k + 32), (__m512bh)_mm512_loadu_si512(a + k + 32));
    }
    if (k < in) acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(a + k));
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* y[t][o0 .. o0+n) += round(h_t . B_o) for n <= 16 outputs and the segment's rows t: each
 * output's dot product over the rank in one lane, 16 of them folded together by sum16. With
 * rank <= 16 the block of B is converted once and kept in registers for all rows. */
static inline void add_delta(const __m512 *part, int n, uint16_t *yrow, const uint16_t *s, const uint16_t *sh) {
    const __mmask16 out_mask = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
    /* lora_B's output is rounded to the weights' dtype, as in PEFT, then added to y and rounded */
    const __m512 delta = bf16x16_to_f32((__m256i)_mm512_cvtneps_pbh(sum16((__m512 *)part)));
    const __m512 yv = bf16x16_to_f32(_mm256_maskz_loadu_epi16(out_mask, yrow));
    __m512 v = _mm512_add_ps(yv, delta);
    if (s) v = _mm512_mul_ps(v, bf16x16_to_f32(_mm256_maskz_loadu_epi16(out_mask, s)));  /* row terms */
    if (sh) v = _mm512_add_ps(v, bf16x16_to_f32(_mm256_maskz_loadu_epi16(out_mask, sh)));
    _mm256_mask_storeu_epi16(yrow, out_mask, (__m256i)_mm512_cvtneps_pbh(v));
}

static void expand_16_bf16(const float *h, int rank, int rows, const uint16_t *b, int64_t b_row_stride, int n,
                           uint16_t *y, int64_t y_stride, const uint16_t *s, const uint16_t *sh) {
    __m512 part[16];
    if (rank <= 16) {
        const __mmask16 m = (__mmask16)((1u << rank) - 1);
        __m512 bo[16];
        for (int o = 0; o < 16; o++)
            bo[o] = o < n ? bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, b + o * b_row_stride)) : _mm512_setzero_ps();
        for (int t = 0; t < rows; t++) {
            const __m512 hv = _mm512_maskz_loadu_ps(m, h + (size_t)t * rank);
            for (int o = 0; o < 16; o++) part[o] = _mm512_mul_ps(hv, bo[o]);
            add_delta(part, n, y + t * y_stride, s, sh);
        }
        return;
    }
    for (int t = 0; t < rows; t++) {
        for (int o = 0; o < 16; o++) part[o] = _mm512_setzero_ps();
        for (int r0 = 0; r0 < rank; r0 += 16) {
            const __mmask16 m = rank - r0 >= 16 ? 0xFFFF : (__mmask16)((1u << (rank - r0)) - 1);
            const __m512 hv = _mm512_maskz_loadu_ps(m, h + (size_t)t * rank + r0);
            for (int o = 0; o < n; o++)
                part[o] = _mm512_fmadd_ps(hv, bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, b + o * b_row_stride + r0)),
                                          part[o]);
        }
        add_delta(part, n, y + t * y_stride, s, sh);
    }
}
#endif

/* One module, with AVX-512 (bf16) or plain loops: the path without AMX, and for fp32. y points
 * at the module's first column, y_col of the projection (where its row terms start). */
static int lora_add_module(const void *x, int64_t x_stride, int in, void *y, int64_t y_stride, int out, const void *a,
                           int64_t a_slot_stride, const void *b, int64_t b_slot_stride, int64_t b_row_stride, int rank,
                           int num_segments, const int64_t *seg_start, const int64_t *seg_len, const int64_t *seg_slot,
                           const struct row_terms *rt, int64_t y_col, int is_bf16, int num_threads) {
    const size_t es = is_bf16 ? 2 : 4;
    /* Rows of all segments packed: segment i's token t is packed row off[i] + t. */
    int64_t *off = malloc(sizeof(int64_t) * (num_segments + 1));
    if (!off) return -1;
    off[0] = 0;
    for (int i = 0; i < num_segments; i++) off[i + 1] = off[i] + seg_len[i];
    float *h = malloc(sizeof(float) * ((size_t)off[num_segments] * rank + 1));      /* [rows][rank] */
    float *xs = NULL;
    int status = -1;
    const int nt = num_threads > 1 && num_segments * rank > 4 ? num_threads : 1;
    if (!h) goto done;
#ifdef HAVE_BF16_LORA
    if (is_bf16 && in % 32 == 0) {
        const uint16_t *xb = x, *ab = a, *bb = b;
        uint16_t *yb = y;
#pragma omp parallel num_threads(nt)
        {
#pragma omp for schedule(static)
            for (int task = 0; task < num_segments * rank; task++) {
                const int i = task / rank, r = task % rank;
                const uint16_t *ar = ab + (size_t)seg_slot[i] * a_slot_stride + (size_t)r * in;
                for (int t = 0; t < seg_len[i]; t++)
                    h[(size_t)(off[i] + t) * rank + r] =
                        round_to(shrink_dot_bf16(xb + (seg_start[i] + t) * x_stride, ar, in), 1);
            }
            const int blocks = (out + 15) / 16;
#pragma omp for schedule(static)
            for (int task = 0; task < num_segments * blocks; task++) {
                const int i = task / blocks, o0 = (task % blocks) * 16, n = out - o0 < 16 ? out - o0 : 16;
                const uint16_t *bs = bb + (size_t)seg_slot[i] * b_slot_stride + (size_t)o0 * b_row_stride;
                expand_16_bf16(h + (size_t)off[i] * rank, rank, (int)seg_len[i], bs, b_row_stride, n,
                               yb + seg_start[i] * y_stride + o0, y_stride,
                               term_at(rt, rt ? rt->scale : NULL, i, y_col + o0, 2),
                               term_at(rt, rt ? rt->shift : NULL, i, y_col + o0, 2));
            }
        }
        status = 0;
        goto done;
    }
#endif
    xs = malloc(sizeof(float) * ((size_t)off[num_segments] * in + ROW_PAD));  /* [rows][in] */
    if (!xs) goto done;
    for (int i = 0; i < num_segments; i++)
        for (int t = 0; t < seg_len[i]; t++)
            load_row(xs + (size_t)(off[i] + t) * in, (const char *)x + (size_t)(seg_start[i] + t) * x_stride * es,
                     in, is_bf16);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int task = 0; task < num_segments * rank; task++) {
        const int i = task / rank, r = task % rank;
        float row[MAX_IN + ROW_PAD];
        load_row(row, (const char *)a + ((size_t)seg_slot[i] * a_slot_stride + (size_t)r * in) * es, in, is_bf16);
        for (int t = 0; t < seg_len[i]; t++)  /* rounded: lora_A's output is in the weights' dtype in PEFT */
            h[(size_t)(off[i] + t) * rank + r] = round_to(dot_f32(xs + (size_t)(off[i] + t) * in, row, in), is_bf16);
    }
    const int chunks = (out + 63) / 64;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int task = 0; task < num_segments * chunks; task++) {
        const int i = task / chunks, o0 = (task % chunks) * 64, n = out - o0 < 64 ? out - o0 : 64;
        const char *bs = (const char *)b + (size_t)seg_slot[i] * b_slot_stride * es;
        /* B's 64 x rank block transposed to [rank][64], so each token's expand is rank
         * 64-wide vector FMAs instead of 64 short dot products. */
        float bt[MAX_RANK][64], row[MAX_RANK + ROW_PAD], yo[64 + ROW_PAD], delta[64 + ROW_PAD];
        float sv[64 + ROW_PAD], tv[64 + ROW_PAD];  /* the segment's row terms for these outputs */
        const void *s = term_at(rt, rt ? rt->scale : NULL, i, y_col + o0, es);
        const void *sh = term_at(rt, rt ? rt->shift : NULL, i, y_col + o0, es);
        if (s) load_row(sv, s, n, is_bf16);
        if (sh) load_row(tv, sh, n, is_bf16);
        for (int o = 0; o < 64; o++) {
            if (o < n) load_row(row, bs + (size_t)(o0 + o) * b_row_stride * es, rank, is_bf16);
            for (int r = 0; r < rank; r++) bt[r][o] = o < n ? row[r] : 0.f;
        }
        for (int t = 0; t < seg_len[i]; t++) {
            const float *ht = h + (size_t)(off[i] + t) * rank;
            for (int o = 0; o < 64; o++) delta[o] = 0.f;
            for (int r = 0; r < rank; r++) {
                const float hr = ht[r];
#pragma omp simd
                for (int o = 0; o < 64; o++) delta[o] += hr * bt[r][o];
            }
            round_row(delta, n, is_bf16);  /* lora_B's output in the weights' dtype, as in PEFT */
            char *yrow = (char *)y + ((size_t)(seg_start[i] + t) * y_stride + o0) * es;
            load_row(yo, yrow, n, is_bf16);
#pragma omp simd
            for (int o = 0; o < n; o++) yo[o] += delta[o];
            if (s)
                for (int o = 0; o < n; o++) yo[o] *= sv[o];
            if (sh)
                for (int o = 0; o < n; o++) yo[o] += tv[o];
            store_row(yrow, yo, n, is_bf16);
        }
    }
    status = 0;
done:
    free(off);
    free(h);
    free(xs);
    return status;
}

int lora_add(const void *x, int64_t x_stride, int in, void *y, int64_t y_stride, int num_modules,
             const int64_t *table, int rank, int num_segments, const int64_t *seg_start, const int64_t *seg_len,
             const int64_t *seg_slot, const void *row_scale, const void *row_shift, int64_t term_stride,
             const int64_t *seg_term_row, int is_bf16, int use_amx, int num_threads) {
    if (rank > MAX_RANK || in > MAX_IN || rank < 1 || in < 1) return -1;
    int longest = 0;
    for (int i = 0; i < num_segments; i++) {
        if (seg_len[i] < 0 || seg_slot[i] < 0) return -1;
        if (seg_len[i] > longest) longest = (int)seg_len[i];
    }
    const struct lora_module *mods = (const struct lora_module *)table;
    const struct row_terms terms = {row_scale, row_shift, term_stride, seg_term_row};
    const struct row_terms *rt = seg_term_row && (row_scale || row_shift) ? &terms : NULL;
    if (use_amx) /* the caller's choice (kernels/lora.py, LoraModules.amx); -1 where it cannot run */
        return is_bf16 ? lora_group_amx(x, x_stride, in, y, y_stride, num_modules, mods, rank, num_segments,
                                        seg_start, seg_len, seg_slot, rt, num_threads)
                       : -1;
    if (longest > MAX_SEG_ROWS) return -1; /* the AMX path takes any length, this one short segments */
    const size_t es = is_bf16 ? 2 : 4;
    for (int m = 0; m < num_modules; m++)
        if (lora_add_module(x, x_stride, in, (char *)y + mods[m].y_col * es, y_stride, (int)mods[m].out,
                            (const void *)mods[m].a, mods[m].a_slot_stride, (const void *)mods[m].b,
                            mods[m].b_slot_stride, mods[m].b_row_stride, rank, num_segments, seg_start, seg_len,
                            seg_slot, rt, mods[m].y_col, is_bf16, num_threads) != 0)
            return -1;
    return 0;
}
