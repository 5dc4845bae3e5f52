/* Segmented LoRA on AMX tiles (bf16): all of a projection's targeted modules in one call, for
 * segments of any length. Layouts and semantics: lora.c and lora.h.
 *
 * Each 16-token block of a segment is one thread's, start to end:
 *   x^T      its rows transposed once into bf16 pairs (tokens past the block are zero): the
 *            B operand of the shrink;
 *   shrink   h^T[16 ranks][16 tokens] = A rows (tile A straight from the pool) . x^T, three
 *            (module, rank tile) products per x^T load, rounded to bf16 (lora_A's output dtype
 *            in PEFT) into h[tokens][ranks], zero past the rank;
 *   expand   y[tokens][16 outputs] += h (tile A) . B^T, B^T's bf16 pairs transposed from the
 *            pool's [out][R] rows in registers, two output blocks in flight; the delta is
 *            rounded to bf16 before the add.
 * Results for tokens past a block's end are computed and dropped.
 */
#include <stdlib.h>

#include "common.h"
#include "lora.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
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

/* y rows (n tokens, 16 outputs from y0, nout valid) += the delta in c [16][16], rounded first;
 * then * s + t where given (the outputs' row terms). */
static inline void add_tile(const float *c, int n, uint16_t *y0, int64_t y_stride, int nout, const uint16_t *s,
                            const uint16_t *sh) {
    const __mmask16 om = (__mmask16)((1u << nout) - 1);
    const __m512 sv = s ? bf16x16_to_f32(_mm256_maskz_loadu_epi16(om, s)) : _mm512_set1_ps(1.f);
    const __m512 tv = sh ? bf16x16_to_f32(_mm256_maskz_loadu_epi16(om, sh)) : _mm512_setzero_ps();
    for (int t = 0; t < n; t++) {
        uint16_t *yrow = y0 + t * y_stride;
        const __m512 delta = bf16x16_to_f32((__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c + 16 * t)));
        const __m512 yv = bf16x16_to_f32(_mm256_maskz_loadu_epi16(om, yrow));
        const __m512 v = _mm512_add_ps(yv, delta);
        _mm256_mask_storeu_epi16(yrow, om, (__m256i)_mm512_cvtneps_pbh(s || sh ? _mm512_fmadd_ps(v, sv, tv) : v));
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
                           uint16_t *h, float *c0, float *c1, uint32_t *bt0, uint32_t *bt1,
                           const struct row_terms *rt, int64_t seg) {
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
        /* this segment's row terms for the module's outputs (NULL: none) */
        const uint16_t *sm = term_at(rt, rt ? rt->scale : NULL, seg, mods[m].y_col, 2);
        const uint16_t *tm = term_at(rt, rt ? rt->shift : NULL, seg, mods[m].y_col, 2);
#define TERMS(ob) (sm ? sm + (ob) * 16 : NULL), (tm ? tm + (ob) * 16 : NULL)
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
                add_tile(c0, n, ym + ob * 16, y_stride, 16, TERMS(ob));
                add_tile(c1, n, ym + (ob + 1) * 16, y_stride, n1, TERMS(ob + 1));
            }
            if (ob < obs) {
                const int n0 = out - ob * 16 < 16 ? out - ob * 16 : 16;
                b_pairs(bs + ob * 16 * brs, brs, n0, 0, re / 2, bt0);
                _tile_loadd(4, bt0, 64);
                _tile_zero(0);
                _tile_dpbf16ps(0, 7, 4);
                _tile_stored(0, c0, 64);
                add_tile(c0, n, ym + ob * 16, y_stride, n0, TERMS(ob));
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
                add_tile(c0, n, ym + ob * 16, y_stride, n0, TERMS(ob));
            }
        }
#undef TERMS
    }
}

/* Segments of any length, in blocks of 16 tokens. The blocks are independent: each thread takes whole blocks through all three steps,
 * with its own scratch, so nothing crosses cores (on this CPU a cache line moving between
 * cores costs more than a tile product). */
int lora_group_amx(const void *xv, int64_t x_stride, int in, void *yv, int64_t y_stride, int num_modules,
                   const struct lora_module *mods, int rank, int num_segments, const int64_t *seg_start,
                   const int64_t *seg_len, const int64_t *seg_slot, const struct row_terms *rt, int num_threads) {
    const uint16_t *x = xv;
    uint16_t *y = yv;
    /* 16-rank tiles and whole bf16 pairs must stay inside each slot's rows. The padded rank is
     * B's row stride ([slots, out, rank]); A's slots may lie further apart than their rank rows
     * (a MoE block's experts interleave with the slots). */
    int fits = in % 32 == 0 && amx_init() == 0 && num_modules > 0;
    const int64_t max_rank = num_modules > 0 ? mods[0].b_row_stride : 0;
    for (int m = 0; m < num_modules && fits; m++)
        fits = mods[m].a_slot_stride >= max_rank * in && mods[m].b_row_stride == max_rank && max_rank % 16 == 0
               && max_rank > 0 && mods[m].out > 0;
    if (!fits || ((rank + 1) & ~1) > max_rank) return -1;
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
                           y_stride, num_modules, mods, seg_slot[i], re, xt, h, c0, c1, bt0, bt1, rt, i);
        }
        _tile_release();
    }
    free(scratch);
    free(blk);
    return 0;
}
#else
int lora_group_amx(const void *x, int64_t x_stride, int in, void *y, int64_t y_stride, int num_modules,
                   const struct lora_module *mods, int rank, int num_segments, const int64_t *seg_start,
                   const int64_t *seg_len, const int64_t *seg_slot, const struct row_terms *rt, int num_threads) {
    (void)x; (void)x_stride; (void)in; (void)y; (void)y_stride; (void)num_modules; (void)mods; (void)rank;
    (void)num_segments; (void)seg_start; (void)seg_len; (void)seg_slot; (void)rt; (void)num_threads;
    return -1;
}
#endif
