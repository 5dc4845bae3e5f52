/* Shared helpers for the native CPU kernels: bf16 <-> fp32 rows and a vectorised exp. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* 0 once the OS has granted this process AMX tile state, -1 where there is none (amx_gemm.c). */
int amx_init(void);

/* The 64-byte operand of LDTILECFG: per tile register, its rows and bytes per row. */
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_tile_config;

/* Element offset of (slot, kv head) in a KV cache laid out [num_blocks][kv_heads][block_size][d],
 * slot = block * block_size + offset: one head's rows of a block are contiguous, so a
 * (request, kv head) task streams whole 2 KiB runs instead of every third 128 bytes. */
static inline int64_t kv_offset(int64_t slot, int h, int kv_heads, int block_size, int d) {
    return ((slot / block_size * kv_heads + h) * block_size + slot % block_size) * d;
}

#if defined(__AVX512F__)
/* 16 bf16 values (bit patterns) to fp32: exact, a shift. */
static inline __m512 bf16x16_to_f32(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

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
#endif

/* n elements starting at src (bf16 bits or fp32) into fp32 dst. */
static inline void load_row(float *restrict dst, const void *src, int n, int is_bf16) {
    if (is_bf16) {
        const uint16_t *s = (const uint16_t *)src;
        uint32_t *d = (uint32_t *)dst;
        for (int i = 0; i < n; i++) d[i] = (uint32_t)s[i] << 16;
    } else {
        memcpy(dst, src, sizeof(float) * (size_t)n);
    }
}

static inline uint16_t bf16_round(uint32_t u) {
    /* round to nearest even; NaN stays NaN */
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40u)
                                           : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline void store_row(void *dst, const float *restrict src, int n, int is_bf16) {
    if (is_bf16) {
        uint16_t *d = (uint16_t *)dst;
        const uint32_t *s = (const uint32_t *)src;
        for (int i = 0; i < n; i++) d[i] = bf16_round(s[i]);
    } else {
        memcpy(dst, src, sizeof(float) * (size_t)n);
    }
}

/* Scratch rows are declared this much longer than needed: rows spaced a multiple of 4 KiB
 * apart make loads and stores falsely alias (4K aliasing) and stall the pipeline. */
#define ROW_PAD 16

/* f rounded to what storing it as the element type would give. */
static inline float round_to(float f, int is_bf16) {
    if (!is_bf16) return f;
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (uint32_t)bf16_round(u) << 16;
    memcpy(&f, &u, 4);
    return f;
}

/* Round a fp32 row in place to what storing it as the element type would give, so fused
 * kernels can reproduce the rounding steps of the unfused torch code they replace. */
static inline void round_row(float *restrict x, int n, int is_bf16) {
    if (!is_bf16) return;
    uint32_t *u = (uint32_t *)x;
    for (int i = 0; i < n; i++) u[i] = (uint32_t)bf16_round(u[i]) << 16;
}

#if defined(__AVX512F__)
/* exp of 16 floats (libm's expf is scalar here): 2^(x log2 e), the integer power applied by
 * scalef and the fraction in [-0.5, 0.5] by its degree-6 Taylor polynomial (relative error
 * below 2.5e-7); results clamped to 2^-126 .. 2^127. */
static inline __m512 exp512(__m512 x) {
    const float c[7] = {1.0f, 6.931471805599453e-1f, 2.402265069591007e-1f, 5.550410866482158e-2f,
                        9.618129107628477e-3f, 1.333355814642844e-3f, 1.540353039338161e-4f};
    __m512 v = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-126.f)), _mm512_set1_ps(127.f));
    __m512 fl = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(v, fl), p = _mm512_set1_ps(c[6]);
    for (int k = 5; k >= 0; k--) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[k]));
    return _mm512_scalef_ps(p, fl);
}
#endif

/* x[i] = exp(x[i]) for x in [-87, 88], returning their sum. */
static inline float exp_inplace_sum(float *restrict x, int n) {
    float sum = 0.f;
    int i = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 p = exp512(_mm512_loadu_ps(x + i));
        _mm512_storeu_ps(x + i, p);
        acc = _mm512_add_ps(acc, p);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) {
        x[i] = expf(x[i]);
        sum += x[i];
    }
    return sum;
}

/* x = cap * tanh(x / cap) in place (Gemma 2's softcap), with tanh(v) = 1 - 2 / (exp(2v) + 1):
 * absolute error about 2.5e-7 x cap (tanhf's: 1e-7 x cap), +-cap past |v| of about 44. */
static inline void softcap_inplace(float *restrict x, int n, float cap) {
    int i = 0;
#if defined(__AVX512F__)
    const __m512 c = _mm512_set1_ps(cap), twice_inv = _mm512_set1_ps(2.f / cap), one = _mm512_set1_ps(1.f),
                 two = _mm512_set1_ps(2.f);
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp512(_mm512_mul_ps(_mm512_loadu_ps(x + i), twice_inv));
        __m512 t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(e, one)));
        _mm512_storeu_ps(x + i, _mm512_mul_ps(c, t));
    }
#endif
    for (; i < n; i++) x[i] = cap * tanhf(x[i] / cap);
}
