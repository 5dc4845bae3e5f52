/* y[M, N] = x[M, K] . W[N, K]^T (+ bias) in bf16 with fp32 accumulation, on Intel AMX tiles.
 *
 * Why not oneDNN: at decode sizes (a few rows) a projection is a pass over its weights, and
 * oneDNN's per-call overhead (about 20 us here) is as long as streaming a 576x576 weight
 * once. This kernel reads weights packed once at load time in tile order, so each thread
 * streams one contiguous range. It runs any number of rows (each pair of output blocks'
 * weights stays in cache while the rows of an M_BLOCK pass over it), but at prefill sizes
 * oneDNN is faster and kernels/dense.py sends those calls there.
 *
 * Packed weight layout (see kernels/dense.py, AmxWeight): [N/16][K/32][16][16][2] bf16: for
 * output block n and input block k, a 16x16 tile of 32-bit pairs, row r holding for each of
 * the block's 16 outputs the inputs (k*32 + 2r, k*32 + 2r + 1): AMX's "VNNI" operand order.
 * Requires K % 32 == 0 and N % 16 == 0 (the caller checks and uses another path otherwise).
 */
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <omp.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
/* Rows of x kept in L2 while a thread walks its output blocks (256 rows x 1536 inputs: 768 KiB). */
#define M_BLOCK 256

/* Linux hands out the tile state only on request, once per process. */
int amx_init(void) {
    static int state = 0; /* 0: not asked yet, 1: granted, -1: refused */
    if (state == 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state == 1 ? 0 : -1;
}

/* Tiles: 0-3 accumulators C[row half][output block], 4-5 x rows (A), 6-7 weights (B). */
static void configure(int rows_a, int rows_b) {
    amx_tile_config cfg = {0};
    cfg.palette_id = 1;
    const int rows[8] = {rows_a, rows_a, rows_b, rows_b, rows_a, rows_b, 16, 16};
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = (uint8_t)(rows[t] ? rows[t] : 1);
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* One pair of 16-output blocks (or a single one) over up to 32 rows of x starting at m0. */
static void tile_pair(const uint16_t *x, int64_t x_stride, int64_t m0, int rows, int K, const uint16_t *w0,
                      int two, const uint16_t *bias, uint16_t *y, int64_t y_stride, int n0, float *cbuf) {
    const int rows_a = rows < 16 ? rows : 16, rows_b = rows - rows_a, kblocks = K / 32;
    const uint16_t *w1 = w0 + (size_t)kblocks * 512;
    const uint16_t *xa = x + m0 * x_stride, *xb = xa + 16 * x_stride;
    const int64_t xs = x_stride * 2;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int kb = 0; kb < kblocks; kb++) {
        _tile_loadd(4, xa + kb * 32, xs);
        _tile_loadd(6, w0 + (size_t)kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (rows_b) {
            _tile_loadd(5, xb + kb * 32, xs);
            _tile_dpbf16ps(2, 5, 6);
        }
        if (two) {
            _tile_loadd(7, w1 + (size_t)kb * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            if (rows_b) _tile_dpbf16ps(3, 5, 7);
        }
    }
    /* cbuf: [32 rows][32 outputs] fp32 */
    _tile_stored(0, cbuf, 128);
    if (two) _tile_stored(1, cbuf + 16, 128);
    if (rows_b) {
        _tile_stored(2, cbuf + 16 * 32, 128);
        if (two) _tile_stored(3, cbuf + 16 * 32 + 16, 128);
    }
    /* bias add and rounding to bf16 (nearest even), 16 outputs per instruction */
    const int width = two ? 32 : 16;
    __m512 b[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    if (bias)
        for (int h = 0; h < width / 16; h++)
            b[h] = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + n0 + 16 * h))), 16));
    for (int r = 0; r < rows; r++) {
        uint16_t *dst = y + (m0 + r) * y_stride + n0;
        for (int h = 0; h < width / 16; h++) {
            const __m512 v = _mm512_add_ps(_mm512_load_ps(cbuf + r * 32 + 16 * h), b[h]);
            _mm256_storeu_si256((__m256i *)(dst + 16 * h), (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

/* Returns 0, or -1 when AMX is unavailable or the shape is unsupported (nothing written). */
int amx_gemm_bf16(const uint16_t *x, int64_t x_stride, int64_t M, int K, const uint16_t *w, int N,
                  const uint16_t *bias, uint16_t *y, int64_t y_stride, int num_threads) {
    if (amx_init() != 0 || K % 32 || N % 16 || K <= 0 || N <= 0) return -1;
    const int nblocks = N / 16, pairs = (nblocks + 1) / 2;
    if (num_threads > pairs) num_threads = pairs;
    if (num_threads < 1) num_threads = 1;
#pragma omp parallel num_threads(num_threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int p0 = (int)((int64_t)pairs * t / nt), p1 = (int)((int64_t)pairs * (t + 1) / nt);
        float cbuf[32 * 32] __attribute__((aligned(64)));
        int configured = -1;
        /* Output blocks outer, rows inner: a pair's weights (K * 64 bytes) stay in cache while
         * every 32-row chunk of x passes over them. */
        for (int64_t mb = 0; mb < M; mb += M_BLOCK)
        for (int p = p0; p < p1; p++) {
            const int nb = 2 * p, two = nb + 1 < nblocks;
            const int64_t m_end = mb + M_BLOCK < M ? mb + M_BLOCK : M;
            for (int64_t m0 = mb; m0 < m_end; m0 += 32) {
                const int rows = m_end - m0 < 32 ? (int)(m_end - m0) : 32;
                if (rows != configured) {
                    configure(rows < 16 ? rows : 16, rows > 16 ? rows - 16 : 0);
                    configured = rows;
                }
                tile_pair(x, x_stride, m0, rows, K, w + (size_t)nb * (K / 32) * 512, two, bias, y, y_stride,
                          nb * 16, cbuf);
            }
        }
        _tile_release();
    }
    return 0;
}
#else
int amx_init(void) { return -1; }

int amx_gemm_bf16(const uint16_t *x, int64_t x_stride, int64_t M, int K, const uint16_t *w, int N,
                  const uint16_t *bias, uint16_t *y, int64_t y_stride, int num_threads) {
    (void)x; (void)x_stride; (void)M; (void)K; (void)w; (void)N; (void)bias; (void)y; (void)y_stride;
    (void)num_threads;
    return -1;
}
#endif
