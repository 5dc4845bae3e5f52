/* y[M, N] = x[M, K] . W[N, K]^T (+ bias) in bf16 with fp32 accumulation, with AVX-512 BF16's
 * dot product (vdpbf16ps), for CPUs that have it but no AMX (AMD Zen 4 and later, Intel
 * Cooper Lake).
 *
 * Why not oneDNN: at decode sizes a projection is one pass over its weights, and oneDNN's
 * blocked layout streams them at about half the memory bandwidth here (SmolLM2's 3072x576
 * gate/up weight at one row: 235 us, 15 GB/s). This kernel reads the weights packed once in
 * the AMX kernel's tile order (kernels/csrc/amx_gemm.c; kernels/dense.py, AmxWeight): for
 * output block n and input block k, 16 rows of 64 bytes, row r holding for each of the
 * block's 16 outputs the inputs (k*32 + 2r, k*32 + 2r + 1). One such row is one vdpbf16ps
 * operand: 16 outputs times one pair of inputs, against that pair of x broadcast. So each
 * thread streams one contiguous range of weights, once per ROWS rows of x.
 * Requires K % 32 == 0 and N % 16 == 0 (the caller checks and uses another path otherwise).
 */
#include "common.h"

#if defined(__AVX512BF16__)
#include <omp.h>

/* Rows of x per pass over a pair of output blocks: 2 x ROWS accumulators stay in registers. */
#define ROWS 8

static inline __m512 dot(__m512 acc, uint32_t x_pair, __m512i w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32((int)x_pair), (__m512bh)w);
}

/* Output blocks nb (and nb + 1 if two) over rows m0 .. m0 + rows of x. Inlined with `rows` a
 * constant (block_pair below), so the loops over rows unroll and the accumulators stay in
 * registers. */
static inline __attribute__((always_inline)) void block_pair_n(const uint16_t *x, int64_t x_stride, int64_t m0,
                                                               const int rows, int K, const uint16_t *w0, int two,
                                                               const uint16_t *bias, uint16_t *y, int64_t y_stride,
                                                               int n0) {
    const int kblocks = K / 32;
    const uint16_t *w1 = w0 + (size_t)kblocks * 512;
    __m512 acc0[ROWS], acc1[ROWS];
    for (int i = 0; i < ROWS; i++) acc0[i] = acc1[i] = _mm512_setzero_ps();
    for (int kb = 0; kb < kblocks; kb++) {
        const uint16_t *a = w0 + (size_t)kb * 512, *b = w1 + (size_t)kb * 512;
        for (int r = 0; r < 16; r++) {
            const __m512i wa = _mm512_loadu_si512(a + r * 32);
            const __m512i wb = two ? _mm512_loadu_si512(b + r * 32) : wa;
            const int64_t k = (int64_t)kb * 32 + 2 * r;
            for (int i = 0; i < rows; i++) {
                uint32_t pair;
                memcpy(&pair, x + (m0 + i) * x_stride + k, 4);
                acc0[i] = dot(acc0[i], pair, wa);
                if (two) acc1[i] = dot(acc1[i], pair, wb);
            }
        }
    }
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (bias) {
        b0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + n0))), 16));
        if (two)
            b1 = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + n0 + 16))), 16));
    }
    for (int i = 0; i < rows; i++) {
        uint16_t *dst = y + (m0 + i) * y_stride + n0;
        _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc0[i], b0)));
        if (two) _mm256_storeu_si256((__m256i *)(dst + 16), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc1[i], b1)));
    }
}

int avx512_bf16_available(void) { return 0; }

static void block_pair(const uint16_t *x, int64_t x_stride, int64_t m0, int rows, int K, const uint16_t *w0, int two,
                       const uint16_t *bias, uint16_t *y, int64_t y_stride, int n0) {
    switch (rows) {
#define ROWS_CASE(n) \
    case n: block_pair_n(x, x_stride, m0, n, K, w0, two, bias, y, y_stride, n0); break;
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
#undef ROWS_CASE
    }
}

/* Returns 0, or -1 when the shape is unsupported (nothing written). */
int avx512_bf16_gemm(const uint16_t *x, int64_t x_stride, int64_t M, int K, const uint16_t *w, int N,
                     const uint16_t *bias, uint16_t *y, int64_t y_stride, int num_threads) {
    if (K % 32 || N % 16 || K <= 0 || N <= 0) return -1;
    const int nblocks = N / 16, pairs = (nblocks + 1) / 2;
    if (num_threads > pairs) num_threads = pairs;
    if (num_threads < 1) num_threads = 1;
#pragma omp parallel num_threads(num_threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int p0 = (int)((int64_t)pairs * t / nt), p1 = (int)((int64_t)pairs * (t + 1) / nt);
        for (int p = p0; p < p1; p++) {
            const int nb = 2 * p, two = nb + 1 < nblocks;
            for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
                const int rows = M - m0 < ROWS ? (int)(M - m0) : ROWS;
                block_pair(x, x_stride, m0, rows, K, w + (size_t)nb * (K / 32) * 512, two, bias, y, y_stride, nb * 16);
            }
        }
    }
    return 0;
}
#else
int avx512_bf16_available(void) { return -1; }

int avx512_bf16_gemm(const uint16_t *x, int64_t x_stride, int64_t M, int K, const uint16_t *w, int N,
                     const uint16_t *bias, uint16_t *y, int64_t y_stride, int num_threads) {
    (void)x; (void)x_stride; (void)M; (void)K; (void)w; (void)N; (void)bias; (void)y; (void)y_stride;
    (void)num_threads;
    return -1;
}
#endif
