/* Fused pointwise steps of a decoder layer on CPU: each replaces several torch ops (and
 * their dispatch overhead, which dominates at decode batch sizes) with one pass over the
 * rows. Rounding to bf16 happens at the same points as in the unfused torch code, so bf16
 * results match it. Element type: bf16 (is_bf16 = 1) or fp32 for every tensor argument.
 * Rows are processed in parallel when there are enough of them to pay for the threads. */
#include <stdlib.h>

#include "common.h"

#define MAX_WIDTH 16384
#define PARALLEL_MIN_ELEMENTS 32768

static inline const char *at(const void *base, int64_t index, int is_bf16) {
    return (const char *)base + index * (is_bf16 ? 2 : 4);
}

/* v = w * v / sqrt(mean(v^2) + eps), in fp32, rounded to bf16 before the weight (Llama) or,
 * with fp32_weight, not (Gemma: its one rounding is the caller's store). */
static inline void normalize_row(float *restrict v, const float *restrict w, int n, float eps, int is_bf16,
                                 int fp32_weight) {
    float ss = 0.f;
#pragma omp simd reduction(+:ss)
    for (int i = 0; i < n; i++) ss += v[i] * v[i];
    const float inv = 1.f / sqrtf(ss / n + eps);
#pragma omp simd
    for (int i = 0; i < n; i++) v[i] *= inv;
    if (!fp32_weight) round_row(v, n, is_bf16);
#pragma omp simd
    for (int i = 0; i < n; i++) v[i] *= w[i];
}

/* If delta: x[t] = x[t] + delta[t] (in place, rounded).  Then
 * out[t] = w * round(x[t] / sqrt(mean(x[t]^2) + eps)), as the HF Llama RMSNorm does; with
 * fp32_weight (w is fp32 whatever x is), out[t] = round(w * x[t] / sqrt(...)), as Gemma's
 * (whose w is 1 + its weight). */
int rms_norm(void *x, const void *delta, const void *w, void *out, int64_t rows, int width, float eps,
             int is_bf16, int num_threads, int fp32_weight) {
    if (width > MAX_WIDTH) return -1;
    const int nt = rows * width >= PARALLEL_MIN_ELEMENTS ? num_threads : 1;
    float *wf = malloc(sizeof(float) * width);
    if (!wf) return -1;
    load_row(wf, w, width, is_bf16 && !fp32_weight);
#pragma omp parallel for num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < rows; t++) {
        float v[MAX_WIDTH + ROW_PAD], dv[MAX_WIDTH + ROW_PAD];
        load_row(v, at(x, t * width, is_bf16), width, is_bf16);
        if (delta) {
            load_row(dv, at(delta, t * width, is_bf16), width, is_bf16);
#pragma omp simd
            for (int i = 0; i < width; i++) v[i] += dv[i];
            round_row(v, width, is_bf16);
            store_row((char *)at(x, t * width, is_bf16), v, width, is_bf16);
        }
        normalize_row(v, wf, width, eps, is_bf16, fp32_weight);
        store_row((char *)at(out, t * width, is_bf16), v, width, is_bf16);
    }
    free(wf);
    return 0;
}

/* qkv rows [heads + 2*kv_heads][d] (row stride row_stride): RMS-normalise each q head with
 * q_w [d] and each k head with k_w [d], in place, rounding as rms_norm does (before the
 * weight, or with fp32_weight after it). Qwen3's and Gemma 3's q/k norms. */
int rms_norm_heads(void *qkv, int64_t row_stride, int64_t rows, int heads, int kv_heads, int d, const void *q_w,
                   const void *k_w, float eps, int is_bf16, int fp32_weight, int num_threads) {
    if (d > 512) return -1;
    const int normed = heads + kv_heads;
    const int nt = rows * normed * d >= PARALLEL_MIN_ELEMENTS ? num_threads : 1;
    float qf[512 + ROW_PAD], kf[512 + ROW_PAD];
    load_row(qf, q_w, d, is_bf16 && !fp32_weight);
    load_row(kf, k_w, d, is_bf16 && !fp32_weight);
#pragma omp parallel for num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < rows; t++) {
        float v[512 + ROW_PAD];
        for (int h = 0; h < normed; h++) {
            char *row = (char *)at(qkv, t * row_stride + (int64_t)h * d, is_bf16);
            const float *w = h < heads ? qf : kf;
            load_row(v, row, d, is_bf16);
            normalize_row(v, w, d, eps, is_bf16, fp32_weight);
            store_row(row, v, d, is_bf16);
        }
    }
    return 0;
}

/* qkv rows [heads + 2*kv_heads][d] (row stride row_stride): rotate the q and k heads of
 * token t by position positions[t] (cos/sin tables [max_pos][rot], HF's rotate-half layout
 * over each head's first rot <= d dims; the rest pass through), in place, then copy its k and
 * v heads to the caches (layout: kv_offset) at slot_mapping[t]. */
int rope_write_kv(void *qkv, int64_t row_stride, int64_t rows, const int64_t *positions, const void *cos_table,
                  const void *sin_table, int heads, int kv_heads, int d, int rot, const int64_t *slot_mapping,
                  void *k_cache, void *v_cache, int block_size, int is_bf16, int num_threads) {
    if (d > 512 || rot > d || rot % 2) return -1;
    const int half = rot / 2, rotated = heads + kv_heads;
    const int nt = rows * rotated * d >= PARALLEL_MIN_ELEMENTS ? num_threads : 1;
#pragma omp parallel for num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < rows; t++) {
        float c[512 + ROW_PAD], s[512 + ROW_PAD], x[512 + ROW_PAD];
        load_row(c, at(cos_table, positions[t] * rot, is_bf16), rot, is_bf16);
        load_row(s, at(sin_table, positions[t] * rot, is_bf16), rot, is_bf16);
        char *row = (char *)at(qkv, t * row_stride, is_bf16);
        for (int h = 0; h < rotated; h++) {
            char *head = (char *)at(row, (int64_t)h * d, is_bf16);
            load_row(x, head, d, is_bf16);
            /* x*cos + rotate_half(x)*sin, each product rounded as torch would */
#pragma omp simd
            for (int i = 0; i < half; i++) {
                const float lo = x[i], hi = x[i + half];
                x[i] = round_to(lo * c[i], is_bf16) + round_to(-hi * s[i], is_bf16);
                x[i + half] = round_to(hi * c[i + half], is_bf16) + round_to(lo * s[i + half], is_bf16);
            }
            store_row(head, x, d, is_bf16);
        }
        const int64_t slot = slot_mapping[t];
        const size_t head_bytes = (size_t)d * (is_bf16 ? 2 : 4);
        for (int h = 0; h < kv_heads; h++) {
            const int64_t dst = kv_offset(slot, h, kv_heads, block_size, d);
            memcpy((char *)at(k_cache, dst, is_bf16), at(row, (int64_t)(heads + h) * d, is_bf16), head_bytes);
            memcpy((char *)at(v_cache, dst, is_bf16), at(row, (int64_t)(rotated + h) * d, is_bf16), head_bytes);
        }
    }
    return 0;
}

/* out[t] = round(silu(gate_up[t, :width])) * gate_up[t, width:] */
int silu_mul(const void *gate_up, void *out, int64_t rows, int width, int is_bf16, int num_threads) {
    if (width > MAX_WIDTH) return -1;
    const int nt = rows * width >= PARALLEL_MIN_ELEMENTS ? num_threads : 1;
#pragma omp parallel for num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < rows; t++) {
        float g[MAX_WIDTH + ROW_PAD], u[MAX_WIDTH + ROW_PAD], e[MAX_WIDTH + ROW_PAD];
        load_row(g, at(gate_up, t * 2 * width, is_bf16), width, is_bf16);
        load_row(u, at(gate_up, t * 2 * width + width, is_bf16), width, is_bf16);
#pragma omp simd
        for (int i = 0; i < width; i++) e[i] = -g[i];
        exp_inplace_sum(e, width);
#pragma omp simd
        for (int i = 0; i < width; i++) g[i] = g[i] / (1.f + e[i]);
        round_row(g, width, is_bf16);
#pragma omp simd
        for (int i = 0; i < width; i++) g[i] *= u[i];
        store_row((char *)at(out, t * width, is_bf16), g, width, is_bf16);
    }
    return 0;
}

/* out[r] = index of the first maximum of row r (n values, bf16 bits or fp32; rows `stride`
 * elements apart): greedy sampling without converting the logits to fp32 first. NaN is never
 * a maximum here (callers do not feed NaN logits: the engine refuses non-finite weights). */
int argmax_rows(const void *x, int64_t stride, int64_t rows, int64_t n, int is_bf16, int64_t *out, int num_threads) {
    if (n < 1) return -1;
    const int nt = rows * n >= PARALLEL_MIN_ELEMENTS ? num_threads : 1;
#pragma omp parallel for num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)x + r * stride * (is_bf16 ? 2 : 4);
        float best = -INFINITY;
        int64_t arg = 0, i = 0;
#if defined(__AVX512F__)
        /* per lane: its largest value and the first index holding it */
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        __m512i vidx = _mm512_setzero_si512(), cur = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i step = _mm512_set1_epi32(16);
        if (n < (1ll << 31))
            for (; i + 16 <= n; i += 16) {
                const __m512 v = is_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                               _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + i * 2))), 16))
                                         : _mm512_loadu_ps((const float *)row + i);
                const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
                vmax = _mm512_mask_mov_ps(vmax, gt, v);
                vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
                cur = _mm512_add_epi32(cur, step);
            }
        float lanes[16];
        int32_t idx[16];
        _mm512_storeu_ps(lanes, vmax);
        _mm512_storeu_si512(idx, vidx);
        for (int l = 0; l < 16; l++)
            if (lanes[l] > best || (lanes[l] == best && idx[l] < arg)) best = lanes[l], arg = idx[l];
#endif
        for (; i < n; i++) {
            float v;
            if (is_bf16) {
                const uint32_t u = (uint32_t)((const uint16_t *)row)[i] << 16;
                memcpy(&v, &u, 4);
            } else {
                v = ((const float *)row)[i];
            }
            if (v > best) best = v, arg = i;
        }
        out[r] = arg;
    }
    return 0;
}

/* Row r of x (n fp32 values, rows `stride` apart) gets -inf wherever bit i of mask row r is 0:
 * a grammar's allowed tokens, 32 per int32 word, least significant bit first. With AVX-512
 * each 16 mask bits are the store mask of 16 lanes as they are. */
int apply_token_bitmask(float *x, int64_t stride, int64_t rows, int64_t n, const int32_t *mask, int64_t words) {
    if (n < 0 || words * 32 < n) return -1;
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * stride;
        const uint32_t *m = (const uint32_t *)(mask + r * words);
        int64_t i = 0;
#if defined(__AVX512F__)
        const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
        for (; i + 16 <= n; i += 16)
            _mm512_mask_storeu_ps(row + i, (__mmask16)~(m[i >> 5] >> (i & 31)), neg_inf);
#endif
        for (; i < n; i++)
            if (!((m[i >> 5] >> (i & 31)) & 1u)) row[i] = -INFINITY;
    }
    return 0;
}
