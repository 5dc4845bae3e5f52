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
 *
 * Two implementations: AMX tiles (bf16, any segment length; further down), and per module
 * AVX-512 / plain loops for fp32, CPUs without AMX and shapes the tiles do not fit (segments
 * of at most MAX_SEG_ROWS rows: the caller sends longer ones to torch matmuls).
 */
#include <stdlib.h>

#include "common.h"

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

static inline __m512 bf16x16_to_f32(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

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
static inline void add_delta(const __m512 *part, int n, uint16_t *yrow) {
    const __mmask16 out_mask = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
    /* lora_B's output is rounded to the weights' dtype, as in PEFT, then added to y and rounded */
    const __m512 delta = bf16x16_to_f32((__m256i)_mm512_cvtneps_pbh(sum16((__m512 *)part)));
    const __m512 yv = bf16x16_to_f32(_mm256_maskz_loadu_epi16(out_mask, yrow));
    _mm256_mask_storeu_epi16(yrow, out_mask, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(yv, delta)));
}

static void expand_16_bf16(const float *h, int rank, int rows, const uint16_t *b, int64_t b_row_stride, int n,
                           uint16_t *y, int64_t y_stride) {
    __m512 part[16];
    if (rank <= 16) {
        const __mmask16 m = (__mmask16)((1u << rank) - 1);
        __m512 bo[16];
        for (int o = 0; o < 16; o++)
            bo[o] = o < n ? bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, b + o * b_row_stride)) : _mm512_setzero_ps();
        for (int t = 0; t < rows; t++) {
            const __m512 hv = _mm512_maskz_loadu_ps(m, h + (size_t)t * rank);
            for (int o = 0; o < 16; o++) part[o] = _mm512_mul_ps(hv, bo[o]);
            add_delta(part, n, y + t * y_stride);
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
        add_delta(part, n, y + t * y_stride);
    }
}
#endif

/* One module, with AVX-512 (bf16) or plain loops: the path without AMX, and for fp32. */
static int lora_add_module(const void *x, int64_t x_stride, int in, void *y, int64_t y_stride, int out, const void *a,
                           int64_t a_slot_stride, const void *b, int64_t b_slot_stride, int64_t b_row_stride, int rank,
                           int num_segments, const int64_t *seg_start, const int64_t *seg_len, const int64_t *seg_slot,
                           int is_bf16, int num_threads) {
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
                               yb + seg_start[i] * y_stride + o0, y_stride);
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

/* ---- Several modules of one projection in one call (q, k and v share x), on AMX tiles ----
 *
 * table: num_modules rows of 7 int64 (the layout of struct lora_module): the module's first
 * column in y, its output width, and its stacks' addresses and strides. A [slots, R, in] is
 * contiguous per slot (R = a_slot_stride / in, the pool's rank), B [slots, out, R].
 *
 * With AMX and bf16 the work is a few tile products per segment instead of dot products per
 * token and rank:
 *   x^T      the segments' rows transposed once into 32-bit (bf16 pair) columns, shared by every
 *            module: the B operand of the shrink, 16 tokens per tile.
 *   shrink   h^T[ranks][tokens] = A rows (tile A straight from the pool) . x^T, rounded to bf16
 *            (lora_A's output dtype in PEFT) into h[tokens][ranks], zero past the rank.
 *   expand   y[tokens][16 outputs] += h (tile A) . B^T, B^T's bf16 pairs transposed from the
 *            pool's [out][R] rows in registers; the delta is rounded to bf16 before the add.
 * A tile covers 16 token columns from a segment's start; columns past the segment belong to
 * other segments (other adapters) and their results are never stored. */
struct lora_module {
    int64_t y_col, out, a, a_slot_stride, b, b_slot_stride, b_row_stride;
};

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(HAVE_BF16_LORA)
#define HAVE_AMX_LORA 1
#include <omp.h>

/* r[i] lane j <- r[j] lane i, for 16 rows of 16 32-bit lanes. */
static inline void transpose16_epi32(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int q = 0; q < 4; q++) { /* r[4q + c], 128-bit lane L: column 4L + c of rows 4q .. 4q+3 */
        r[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
        r[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
        r[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
        r[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
    }
    for (int c = 0; c < 4; c++) {
        t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
        t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
        t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);
        r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xDD);
        r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xDD);
    }
}

/* Every tile 16 rows of 64 bytes (the caller requires the pool's rank to be a multiple of 16).
 * Shrink: 0-2 accumulators h^T of up to three (module, rank tile) items, 3 x^T pairs, 4-6 their
 * A rows: one x^T load serves three products. Expand: 7 h rows, 4-5 B^T pairs and 0-1
 * accumulators for even and odd output blocks, so a block's loads can start while the previous
 * product runs (tile registers are not renamed). */
static void configure_lora(void) {
    amx_tile_config cfg = {0};
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* B^T pairs of 16 outputs (nout valid) and ranks kc .. kc+31 (pairs valid), VNNI order. */
static inline void b_pairs(const uint16_t *b, int64_t b_row_stride, int nout, int kc, int pairs, uint32_t *bt) {
    const __mmask16 pm = (__mmask16)((1u << pairs) - 1);
    __m512i r[16];
    for (int o = 0; o < 16; o++)
        r[o] = o < nout ? _mm512_maskz_loadu_epi32(pm, b + o * b_row_stride + kc) : _mm512_setzero_si512();
    transpose16_epi32(r);
    for (int k = 0; k < 16; k++) _mm512_store_si512(bt + 16 * k, r[k]);
}

/* y rows (n tokens, 16 outputs from y0, nout valid) += the delta in c [16][16], rounded first. */
static inline void add_tile(const float *c, int n, uint16_t *y0, int64_t y_stride, int nout) {
    const __mmask16 om = (__mmask16)((1u << nout) - 1);
    for (int t = 0; t < n; t++) {
        uint16_t *yrow = y0 + t * y_stride;
        const __m512 delta = bf16x16_to_f32((__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c + 16 * t)));
        const __m512 yv = bf16x16_to_f32(_mm256_maskz_loadu_epi16(om, yrow));
        _mm256_mask_storeu_epi16(yrow, om, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(yv, delta)));
    }
}

/* h rows of one 16-token block: the 16 x 16 h^T tile in c (ranks x tokens) transposed, rounded
 * to bf16, stored at ranks r0 .. r0+15 of the first n rows (row stride kp). */
static inline void store_h(const float *c, int n, uint16_t *h, int kp, int r0) {
    __m512i r[16];
    for (int k = 0; k < 16; k++) r[k] = _mm512_load_si512(c + 16 * k);
    transpose16_epi32(r);
    for (int t = 0; t < n; t++)
        _mm256_storeu_si256((__m256i *)(h + t * kp + r0), (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[t])));
}

/* One block of n <= 16 tokens of one segment (x rows from x0, y rows from y0), every module. */
static void lora_block_amx(const uint16_t *x0, int64_t x_stride, int in, int n, uint16_t *y0, int64_t y_stride,
                           int num_modules, const struct lora_module *mods, int64_t slot, int re, uint32_t *xt,
                           uint16_t *h, float *c0, float *c1, uint32_t *bt0, uint32_t *bt1) {
    const int kblocks = in / 32, rank_tiles = (re + 15) / 16, kp = (re + 31) & ~31;
    /* x^T: word k of token t at xt[k * 16 + t]; tokens past n are zero */
    for (int wb = 0; wb < in / 32; wb++) {
        __m512i r[16];
        for (int t = 0; t < 16; t++)
            r[t] = t < n ? _mm512_loadu_si512((const uint32_t *)(x0 + t * x_stride) + wb * 16) : _mm512_setzero_si512();
        transpose16_epi32(r);
        for (int k = 0; k < 16; k++) _mm512_store_si512(xt + (wb * 16 + k) * 16, r[k]);
    }
    /* shrink: items (module, rank tile), three per pass over x^T */
    const int items = num_modules * rank_tiles;
    for (int it = 0; it < items; it += 3) {
        const int g = items - it < 3 ? items - it : 3;
        const uint16_t *ar[3];
        for (int j = 0; j < g; j++) {
            const struct lora_module *md = &mods[(it + j) / rank_tiles];
            ar[j] = (const uint16_t *)md->a + slot * md->a_slot_stride + (int64_t)((it + j) % rank_tiles) * 16 * in;
        }
        _tile_zero(0);
        if (g > 1) _tile_zero(1);
        if (g > 2) _tile_zero(2);
        for (int kb = 0; kb < kblocks; kb++) {
            _tile_loadd(3, xt + kb * 256, 64);
            _tile_loadd(4, ar[0] + kb * 32, in * 2);
            _tile_dpbf16ps(0, 4, 3);
            if (g > 1) {
                _tile_loadd(5, ar[1] + kb * 32, in * 2);
                _tile_dpbf16ps(1, 5, 3);
            }
            if (g > 2) {
                _tile_loadd(6, ar[2] + kb * 32, in * 2);
                _tile_dpbf16ps(2, 6, 3);
            }
        }
        _tile_stored(0, c0, 64);
        if (g > 1) _tile_stored(1, c1, 64);
        if (g > 2) _tile_stored(2, (float *)bt0, 64);
        const float *cs[3] = {c0, c1, (const float *)bt0};
        for (int j = 0; j < g; j++)
            store_h(cs[j], n, h + (int64_t)((it + j) / rank_tiles) * 16 * kp, kp, ((it + j) % rank_tiles) * 16);
    }
    if (rank_tiles * 16 < kp) /* h meets zero B^T pairs past the rank; stale bits could be NaN */
        for (int m = 0; m < num_modules; m++)
            for (int t = 0; t < n; t++) _mm256_storeu_si256((__m256i *)(h + ((int64_t)m * 16 + t) * kp + rank_tiles * 16),
                                                            _mm256_setzero_si256());
    /* expand: y[16 tokens][16 outputs] += h . B^T for every output block */
    for (int m = 0; m < num_modules; m++) {
        const int out = (int)mods[m].out, obs = (out + 15) / 16;
        const int64_t brs = mods[m].b_row_stride;
        const uint16_t *bs = (const uint16_t *)mods[m].b + slot * mods[m].b_slot_stride;
        const uint16_t *hm = h + (int64_t)m * 16 * kp;
        uint16_t *ym = y0 + mods[m].y_col;
        if (kp == 32) {
            _tile_loadd(7, hm, kp * 2);
            int ob = 0;
            for (; ob + 2 <= obs; ob += 2) {
                const int n1 = out - (ob + 1) * 16 < 16 ? out - (ob + 1) * 16 : 16;
                b_pairs(bs + ob * 16 * brs, brs, 16, 0, re / 2, bt0);
                b_pairs(bs + (ob + 1) * 16 * brs, brs, n1, 0, re / 2, bt1);
                _tile_loadd(4, bt0, 64);
                _tile_loadd(5, bt1, 64);
                _tile_zero(0);
                _tile_zero(1);
                _tile_dpbf16ps(0, 7, 4);
                _tile_dpbf16ps(1, 7, 5);
                _tile_stored(0, c0, 64);
                _tile_stored(1, c1, 64);
                add_tile(c0, n, ym + ob * 16, y_stride, 16);
                add_tile(c1, n, ym + (ob + 1) * 16, y_stride, n1);
            }
            if (ob < obs) {
                const int n0 = out - ob * 16 < 16 ? out - ob * 16 : 16;
                b_pairs(bs + ob * 16 * brs, brs, n0, 0, re / 2, bt0);
                _tile_loadd(4, bt0, 64);
                _tile_zero(0);
                _tile_dpbf16ps(0, 7, 4);
                _tile_stored(0, c0, 64);
                add_tile(c0, n, ym + ob * 16, y_stride, n0);
            }
        } else {
            for (int ob = 0; ob < obs; ob++) {
                const int n0 = out - ob * 16 < 16 ? out - ob * 16 : 16;
                _tile_zero(0);
                for (int kc = 0; kc < kp; kc += 32) {
                    b_pairs(bs + ob * 16 * brs, brs, n0, kc, (re - kc) / 2 < 16 ? (re - kc) / 2 : 16, bt0);
                    _tile_loadd(7, hm + kc, kp * 2);
                    _tile_loadd(4, bt0, 64);
                    _tile_dpbf16ps(0, 7, 4);
                }
                _tile_stored(0, c0, 64);
                add_tile(c0, n, ym + ob * 16, y_stride, n0);
            }
        }
    }
}

/* Segments of any length, in blocks of 16 tokens. The blocks are independent: each thread takes whole blocks through all three steps,
 * with its own scratch, so nothing crosses cores (on this CPU a cache line moving between
 * cores costs more than a tile product). */
static int lora_group_amx(const uint16_t *x, int64_t x_stride, int in, uint16_t *y, int64_t y_stride,
                          int num_modules, const struct lora_module *mods, int rank, int num_segments,
                          const int64_t *seg_start, const int64_t *seg_len, const int64_t *seg_slot, int num_threads) {
    const int re = (rank + 1) & ~1; /* whole bf16 pairs: the pool's zeros fill an odd rank */
    const int kp = (re + 31) & ~31;
    int64_t nblocks = 0;
    for (int i = 0; i < num_segments; i++) nblocks += (seg_len[i] + 15) / 16;
    int64_t *blk = malloc(sizeof(int64_t) * (2 * nblocks + 1));
    if (!blk) return -1;
    for (int i = 0, b = 0; i < num_segments; i++)
        for (int64_t t = 0; t < seg_len[i]; t += 16, b++) blk[2 * b] = i, blk[2 * b + 1] = t;
    const int nt = nblocks < num_threads ? (int)nblocks : num_threads > 0 ? num_threads : 1;
    /* per thread: x^T [in/2][16] words, h [modules][16][kp] */
    const size_t xt_words = (size_t)in / 2 * 16, h_elems = (size_t)num_modules * 16 * kp;
    const size_t per_thread = (xt_words * 4 + h_elems * 2 + 63) / 64 * 64;
    char *scratch = aligned_alloc(64, per_thread * (nt > 0 ? nt : 1));
    if (!scratch) {
        free(blk);
        return -1;
    }
#pragma omp parallel num_threads(nt > 0 ? nt : 1)
    {
        char *mine = scratch + per_thread * omp_get_thread_num();
        uint32_t *xt = (uint32_t *)mine;
        uint16_t *h = (uint16_t *)(mine + xt_words * 4);
        float c0[16 * 16] __attribute__((aligned(64))), c1[16 * 16] __attribute__((aligned(64)));
        uint32_t bt0[16 * 16] __attribute__((aligned(64))), bt1[16 * 16] __attribute__((aligned(64)));
        configure_lora();
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t i = blk[2 * b], t0 = blk[2 * b + 1];
            const int n = seg_len[i] - t0 < 16 ? (int)(seg_len[i] - t0) : 16;
            lora_block_amx(x + (seg_start[i] + t0) * x_stride, x_stride, in, n, y + (seg_start[i] + t0) * y_stride,
                           y_stride, num_modules, mods, seg_slot[i], re, xt, h, c0, c1, bt0, bt1);
        }
        _tile_release();
    }
    free(scratch);
    free(blk);
    return 0;
}
#endif

int lora_add(const void *x, int64_t x_stride, int in, void *y, int64_t y_stride, int num_modules,
             const int64_t *table, int rank, int num_segments, const int64_t *seg_start, const int64_t *seg_len,
             const int64_t *seg_slot, int is_bf16, int use_amx, int num_threads) {
    if (rank > MAX_RANK || in > MAX_IN || rank < 1 || in < 1) return -1;
    int longest = 0;
    for (int i = 0; i < num_segments; i++) {
        if (seg_len[i] < 0 || seg_slot[i] < 0) return -1;
        if (seg_len[i] > longest) longest = (int)seg_len[i];
    }
    const struct lora_module *mods = (const struct lora_module *)table;
    if (use_amx) { /* the caller's choice (kernels/lora.py, LoraModules.amx), checked here */
#ifdef HAVE_AMX_LORA
        /* 16-rank tiles and whole bf16 pairs must stay inside each slot's rows. */
        int fits = is_bf16 && in % 32 == 0 && amx_init() == 0 && num_modules > 0;
        const int64_t max_rank = num_modules > 0 ? mods[0].a_slot_stride / in : 0;
        for (int m = 0; m < num_modules && fits; m++)
            fits = mods[m].a_slot_stride == max_rank * in && mods[m].b_row_stride == max_rank && max_rank % 16 == 0
                   && max_rank > 0 && mods[m].out > 0;
        if (fits && ((rank + 1) & ~1) <= max_rank)
            return lora_group_amx(x, x_stride, in, y, y_stride, num_modules, mods, rank, num_segments, seg_start,
                                  seg_len, seg_slot, num_threads);
#endif
        return -1;
    }
    if (longest > MAX_SEG_ROWS) return -1; /* the AMX path takes any length, this one short segments */
    const size_t es = is_bf16 ? 2 : 4;
    for (int m = 0; m < num_modules; m++)
        if (lora_add_module(x, x_stride, in, (char *)y + mods[m].y_col * es, y_stride, (int)mods[m].out,
                            (const void *)mods[m].a, mods[m].a_slot_stride, (const void *)mods[m].b,
                            mods[m].b_slot_stride, mods[m].b_row_stride, rank, num_segments, seg_start, seg_len,
                            seg_slot, is_bf16, num_threads) != 0)
            return -1;
    return 0;
}
