/* polyquant: AQLM additive code books (codes [N][G][M], code books [M][K][ig], one scale per output row).
 *
 * Weight (n, group i) = s[n] * sum_m cb[m][codes[n][i][m]][0..ig)   (out_group_size 1).
 *
 * pq_aqlm_lut_mm: y = x @ W^T for a few activation rows. Per activation row, the dot products of each
 *   input group's ig-vector with every code word form a table lut[i][m][k] (the aqlm package's Numba
 *   idea); each output is then a sum of G*M table look-ups times its scale. The table is built from the
 *   transposed code books cbT[m][j][k] (vectorised over k). K <= 256 (uint8 codes).
 * pq_aqlm_gather_mm: any K (uint16 codes, e.g. 1x16): per output, gather each code word and dot it with
 *   the input group.
 * pq_aqlm_sweep: one greedy pass of the code search used by the quantizer (see methods/aqlm.py): for
 *   each output row and each input group, each code book's code is replaced by the one minimising the
 *   Hessian-weighted output error with the rest fixed, R = W - Q and G = R H kept up to date. Rows are
 *   independent (the objective is a sum over rows), so rows run in parallel tiles.
 *
 * Code paths: the same C compiled twice, portable and with AVX2+FMA enabled (auto-vectorised), plus
 * AVX2 gathers for the table look-ups; simd 1 = AVX-512F (the table build with 16-wide FMAs, register-
 * blocked over four input groups; the rest as AVX2: 16-wide gathers were slower here), 2 = AVX2,
 * 0 = portable.
 */
#include <stdlib.h>
#include <string.h>
#include <float.h>

#include "pq_common.h"

#ifdef PQ_X86
#define AVX2_FN __attribute__((target("avx2,fma")))
#define AVX512_FN __attribute__((target("avx512f,avx2,fma")))
#else
#define AVX2_FN
#endif

int pq_aqlm_simd_level(void) { return pq_f32_simd_level(1); }

/* ---- table build: lut[(i*M + m)*K + k] = x[i*ig .. +ig) . cb[m][k] ---------------------------- */
#define BUILD_LUT_BODY                                                                              \
    for (int64_t i = 0; i < G; i++) {                                                               \
        const float *xg = x + i * ig;                                                               \
        for (int64_t m = 0; m < M; m++) {                                                           \
            float *restrict t = lut + (i * M + m) * K;                                              \
            const float *ct = cbT + m * ig * K;                                                     \
            for (int64_t k = 0; k < K; k++) t[k] = xg[0] * ct[k];                                   \
            for (int64_t j = 1; j < ig; j++) {                                                      \
                const float xj = xg[j];                                                             \
                const float *restrict cj = ct + j * K;                                              \
                for (int64_t k = 0; k < K; k++) t[k] += xj * cj[k];                                 \
            }                                                                                       \
        }                                                                                           \
    }

static void build_lut_portable(int64_t G, int64_t M, int64_t K, int64_t ig, const float *x, const float *cbT,
                               float *lut) { BUILD_LUT_BODY }

#ifdef PQ_X86
/* The same table, register-blocked: 64 entries of one table (eight vectors: eight independent FMA
 * chains; smaller K eight entries at a time) accumulate in registers over the ig input columns, so each
 * code-book element is loaded once and each entry stored once (the loop above reloads and stores the
 * whole row of K entries for every column). K not a multiple of 8 takes the loop above. */
AVX2_FN static void build_lut_avx2(int64_t G, int64_t M, int64_t K, int64_t ig, const float *x, const float *cbT,
                                   float *lut) {
    if (K % 8) { BUILD_LUT_BODY return; }
    for (int64_t i = 0; i < G; i++) {
        const float *xg = x + i * ig;
        for (int64_t m = 0; m < M; m++) {
            float *t = lut + (i * M + m) * K;
            const float *ct = cbT + m * ig * K;
            int64_t k = 0;
            for (; k + 64 <= K; k += 64) { /* eight independent FMA chains */
                __m256 a[8];
                for (int q = 0; q < 8; q++) a[q] = _mm256_setzero_ps();
                for (int64_t j = 0; j < ig; j++) {
                    const __m256 xj = _mm256_broadcast_ss(xg + j);
                    for (int q = 0; q < 8; q++) a[q] = _mm256_fmadd_ps(xj, _mm256_loadu_ps(ct + j * K + k + 8 * q), a[q]);
                }
                for (int q = 0; q < 8; q++) _mm256_storeu_ps(t + k + 8 * q, a[q]);
            }
            for (; k < K; k += 8) { /* K < 64 (code books of 8-32 entries) */
                __m256 a0 = _mm256_setzero_ps();
                for (int64_t j = 0; j < ig; j++)
                    a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(xg + j), _mm256_loadu_ps(ct + j * K + k), a0);
                _mm256_storeu_ps(t + k, a0);
            }
        }
    }
}
#endif

#ifdef PQ_X86
/* The table build with 16-wide FMAs (AVX-512F), register-blocked as a small GEMM: the tables of four
 * input groups over 64 entries (16 zmm accumulators) take, per input column j, four code-book loads and
 * four broadcasts for sixteen FMAs (build_lut_avx2: one load per FMA), since every group reads the same
 * code book. K not a multiple of 64 takes build_lut_avx2. */
#define LUT512_ROWS(R)                                                                              \
    do {                                                                                            \
        __m512 a[R][4];                                                                             \
        for (int r = 0; r < R; r++)                                                                 \
            for (int q = 0; q < 4; q++) a[r][q] = _mm512_setzero_ps();                              \
        for (int64_t j = 0; j < ig; j++) {                                                          \
            const float *cj = ct + j * K + k;                                                       \
            const __m512 b0 = _mm512_loadu_ps(cj), b1 = _mm512_loadu_ps(cj + 16);                   \
            const __m512 b2 = _mm512_loadu_ps(cj + 32), b3 = _mm512_loadu_ps(cj + 48);              \
            for (int r = 0; r < R; r++) {                                                           \
                const __m512 xr = _mm512_set1_ps(x[(i + r) * ig + j]);                              \
                a[r][0] = _mm512_fmadd_ps(xr, b0, a[r][0]);                                         \
                a[r][1] = _mm512_fmadd_ps(xr, b1, a[r][1]);                                         \
                a[r][2] = _mm512_fmadd_ps(xr, b2, a[r][2]);                                         \
                a[r][3] = _mm512_fmadd_ps(xr, b3, a[r][3]);                                         \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < R; r++) {                                                               \
            float *t = lut + ((i + r) * M + m) * K + k;                                             \
            for (int q = 0; q < 4; q++) _mm512_storeu_ps(t + 16 * q, a[r][q]);                      \
        }                                                                                           \
    } while (0)

AVX512_FN static void build_lut_avx512(int64_t G, int64_t M, int64_t K, int64_t ig, const float *x, const float *cbT,
                                       float *lut) {
    if (K % 64) { build_lut_avx2(G, M, K, ig, x, cbT, lut); return; }
    for (int64_t m = 0; m < M; m++) {
        const float *ct = cbT + m * ig * K;
        for (int64_t k = 0; k < K; k += 64) {
            int64_t i = 0;
            for (; i + 4 <= G; i += 4) LUT512_ROWS(4);
            for (; i < G; i++) LUT512_ROWS(1);
        }
    }
}
#endif

/* ---- look-ups: y[n] = s[n] * sum_t lut[t*K + codes[n][t]], t over G*M ------------------------- */
static void lookup_portable(int64_t n0, int64_t n1, int64_t T, int64_t K, const uint8_t *codes, const float *lut,
                            const float *s, float *y) {
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *c = codes + n * T;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        int64_t t = 0;
        for (; t + 4 <= T; t += 4) {
            a0 += lut[t * K + c[t]];
            a1 += lut[(t + 1) * K + c[t + 1]];
            a2 += lut[(t + 2) * K + c[t + 2]];
            a3 += lut[(t + 3) * K + c[t + 3]];
        }
        for (; t < T; t++) a0 += lut[t * K + c[t]];
        y[n] = ((a0 + a1) + (a2 + a3)) * s[n];
    }
}

#ifdef PQ_X86
/* Tables per slice of the look-ups: a slice's tables (LUT_SLICE_BYTES) stay in L1 while every row of a
 * row block reads them; a whole layer's tables (G*M*K floats: 147 KB for 576 inputs, 2x8) would not. */
#define LUT_SLICE_BYTES 32768
#define LUT_ROW_BLOCK 256

AVX2_FN static void lookup_avx2(int64_t n0, int64_t n1, int64_t T, int64_t K, const uint8_t *codes, const float *lut,
                                const float *s, float *y) {
    const __m256i step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i kvec = _mm256_set1_epi32((int)K);
    const __m256i base0 = _mm256_mullo_epi32(step, kvec);
    const __m256i stride = _mm256_set1_epi32((int)(8 * K));
    const int64_t T8 = T - T % 8;             /* tables taken eight at a time by the gathers */
    int64_t ts = (LUT_SLICE_BYTES / (K * 4)) / 8 * 8;
    if (ts < 8) ts = 8;
    __m256 acc[LUT_ROW_BLOCK];                /* one vector of partial sums per row of the block */
    for (int64_t b0 = n0; b0 < n1; b0 += LUT_ROW_BLOCK) {
        const int64_t b1 = b0 + LUT_ROW_BLOCK < n1 ? b0 + LUT_ROW_BLOCK : n1, nb = b1 - b0;
        for (int64_t r = 0; r < nb; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t t0 = 0; t0 < T8; t0 += ts) {
            const int64_t t1 = t0 + ts < T8 ? t0 + ts : T8;
            const float *l = lut + t0 * K;    /* offsets below are relative to the slice's first table */
            int64_t r = 0;
            for (; r + 2 <= nb; r += 2) {     /* two rows at a time: two independent gather chains */
                const uint8_t *c0 = codes + (b0 + r) * T, *c1 = c0 + T;
                if (t0 == 0 && b1 + r + 2 <= n1) /* the next row block's codes, while this one runs */
                    for (int64_t o = 0; o < 2 * T; o += 64) _mm_prefetch((const char *)(c0 + nb * T + o), _MM_HINT_T0);
                __m256 a0 = acc[r], a1 = acc[r + 1];
                __m256i base = base0;
                for (int64_t t = t0; t < t1; t += 8) {
                    __m256i i0 = _mm256_add_epi32(base, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c0 + t))));
                    __m256i i1 = _mm256_add_epi32(base, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c1 + t))));
                    a0 = _mm256_add_ps(a0, _mm256_i32gather_ps(l, i0, 4));
                    a1 = _mm256_add_ps(a1, _mm256_i32gather_ps(l, i1, 4));
                    base = _mm256_add_epi32(base, stride);
                }
                acc[r] = a0;
                acc[r + 1] = a1;
            }
            for (; r < nb; r++) {
                const uint8_t *c0 = codes + (b0 + r) * T;
                __m256 a0 = acc[r];
                __m256i base = base0;
                for (int64_t t = t0; t < t1; t += 8) {
                    __m256i i0 = _mm256_add_epi32(base, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c0 + t))));
                    a0 = _mm256_add_ps(a0, _mm256_i32gather_ps(l, i0, 4));
                    base = _mm256_add_epi32(base, stride);
                }
                acc[r] = a0;
            }
        }
        for (int64_t r = 0; r < nb; r++) {
            const uint8_t *c = codes + (b0 + r) * T;
            float v = pq_hsum8_ps(acc[r]);
            for (int64_t t = T8; t < T; t++) v += lut[t * K + c[t]];
            y[b0 + r] = v * s[b0 + r];
        }
    }
}
#endif

/* x [Mr][ldx] (in = G*ig used), codes [N][G*M] uint8, cbT [M][ig][K], s [N], y [Mr][ldy]; lut: scratch
   of G*M*K floats (one per thread group is not needed: rows are processed one after another). */
void pq_aqlm_lut_mm(int64_t Mr, int64_t N, int64_t G, int64_t ig, int64_t M, int64_t K, const float *x, int64_t ldx,
                    const uint8_t *codes, const float *cbT, const float *s, float *lut, float *y, int64_t ldy,
                    int64_t nthreads, int64_t simd) {
    const int64_t T = G * M;
    for (int64_t r = 0; r < Mr; r++) {
#ifdef PQ_X86
        if (simd == 1 || simd == 3) build_lut_avx512(G, M, K, ig, x + r * ldx, cbT, lut);
        else if (simd == 2) build_lut_avx2(G, M, K, ig, x + r * ldx, cbT, lut);
        else
#endif
            build_lut_portable(G, M, K, ig, x + r * ldx, cbT, lut);
        const int64_t chunk = (N + PQ_THREADS(nthreads) - 1) / PQ_THREADS(nthreads); /* one chunk per thread */
        PQ_FOR_CHUNKS(n0, n1, N, chunk, nthreads) {
#ifdef PQ_X86
            if (simd >= 1) { lookup_avx2(n0, n1, T, K, codes, lut, s, y + r * ldy); continue; }
#endif
            lookup_portable(n0, n1, T, K, codes, lut, s, y + r * ldy);
        }
    }
}

/* The same for decode with its constant arguments in one array (one ctypes conversion instead of ten):
 * p = {N, G, ig, M, K, ldx, codes, cbT, s, simd}, pointers as int64; y is [Mr][N]. */
void pq_aqlm_lut_mv(const int64_t *p, const float *x, int64_t Mr, float *lut, float *y, int64_t nthreads) {
    pq_aqlm_lut_mm(Mr, p[0], p[1], p[2], p[3], p[4], x, p[5], (const uint8_t *)(intptr_t)p[6],
                   (const float *)(intptr_t)p[7], (const float *)(intptr_t)p[8], lut, y, p[0], nthreads, p[9]);
}

/* ---- code-word gather (any K): y[r][n] = s[n] * sum_{i,m} cb[m][codes[n][i][m]] . x[r][i*ig..] ------ */
#define GATHER_BODY                                                                                 \
    for (int64_t n = n0; n < n1; n++) {                                                             \
        const uint16_t *c = codes + n * G * M;                                                      \
        for (int64_t r = 0; r < Mr; r++) {                                                          \
            const float *xr = x + r * ldx;                                                          \
            float acc = 0.f;                                                                        \
            for (int64_t i = 0; i < G; i++) {                                                       \
                float w[64];                                                                        \
                for (int64_t j = 0; j < ig; j++) w[j] = 0.f;                                        \
                for (int64_t m = 0; m < M; m++) {                                                   \
                    const float *cw = cb + (m * K + c[i * M + m]) * ig;                             \
                    for (int64_t j = 0; j < ig; j++) w[j] += cw[j];                                 \
                }                                                                                   \
                const float *xg = xr + i * ig;                                                      \
                for (int64_t j = 0; j < ig; j++) acc += w[j] * xg[j];                               \
            }                                                                                       \
            y[r * ldy + n] = acc * s[n];                                                            \
        }                                                                                           \
    }

static void gather_portable(int64_t n0, int64_t n1, int64_t Mr, int64_t G, int64_t ig, int64_t M, int64_t K,
                            const float *x, int64_t ldx, const uint16_t *codes, const float *cb, const float *s,
                            float *y, int64_t ldy) { GATHER_BODY }
AVX2_FN static void gather_avx2(int64_t n0, int64_t n1, int64_t Mr, int64_t G, int64_t ig, int64_t M, int64_t K,
                                const float *x, int64_t ldx, const uint16_t *codes, const float *cb, const float *s,
                                float *y, int64_t ldy) { GATHER_BODY }

void pq_aqlm_gather_mm(int64_t Mr, int64_t N, int64_t G, int64_t ig, int64_t M, int64_t K, const float *x, int64_t ldx,
                       const uint16_t *codes, const float *cb, const float *s, float *y, int64_t ldy, int64_t nthreads,
                       int64_t simd) {
    const int64_t chunk = (N + PQ_THREADS(nthreads) - 1) / PQ_THREADS(nthreads); /* one chunk per thread */
    PQ_FOR_CHUNKS(n0, n1, N, chunk, nthreads) {
        if (simd >= 1) gather_avx2(n0, n1, Mr, G, ig, M, K, x, ldx, codes, cb, s, y, ldy);
        else gather_portable(n0, n1, Mr, G, ig, M, K, x, ldx, codes, cb, s, y, ldy);
    }
}

/* ---- the quantizer's greedy code pass ----------------------------------------------------------
 * H [in][in], G_ [out][in] (= R H), R [out][in], codes [out][ng][M] int32 (updated), cb [M][K][ig],
 * cbT [M][ig][K], nb [ng][M][K] (c^T H_ii c), s [out]. Returns the number of codes changed. ig <= 64.
 * For row o, group i, code book m, with x0 the group's current reconstruction, b = g + H_ii x0 and
 * y the reconstruction without code book m: cost(k) = s*(2 (H_ii y - b)) . c_k + s^2 nb[k] (+ const);
 * the current code is kept unless another is strictly cheaper. */
#define SWEEP_ROW_BODY                                                                              \
    float Hii[64 * 64], x0[64], b[64], y[64], Hy[64], lin[64];                                      \
    for (int64_t i = 0; i < ng; i++) {                                                              \
        const int64_t c0 = i * ig;                                                                  \
        for (int64_t j = 0; j < ig; j++)                                                            \
            for (int64_t l = 0; l < ig; l++) Hii[j * ig + l] = H[(c0 + j) * in + c0 + l];           \
        for (int64_t o = o0; o < o1; o++) {                                                         \
            int32_t *cur = codes + (o * ng + i) * M;                                                \
            const float so = s[o];                                                                  \
            float *Go = G_ + o * in;                                                                \
            for (int64_t j = 0; j < ig; j++) x0[j] = 0.f;                                           \
            for (int64_t m = 0; m < M; m++) {                                                       \
                const float *cw = cb + (m * K + cur[m]) * ig;                                       \
                for (int64_t j = 0; j < ig; j++) x0[j] += cw[j];                                    \
            }                                                                                       \
            for (int64_t j = 0; j < ig; j++) x0[j] *= so;                                           \
            for (int64_t j = 0; j < ig; j++) {                                                      \
                float acc = Go[c0 + j];                                                             \
                for (int64_t l = 0; l < ig; l++) acc += Hii[j * ig + l] * x0[l];                    \
                b[j] = acc;                                                                         \
            }                                                                                       \
            for (int64_t j = 0; j < ig; j++) y[j] = x0[j];                                          \
            int changed = 0;                                                                        \
            for (int64_t m = 0; m < M; m++) {                                                       \
                const float *cw = cb + (m * K + cur[m]) * ig;                                       \
                for (int64_t j = 0; j < ig; j++) y[j] -= so * cw[j];                                \
                for (int64_t j = 0; j < ig; j++) {                                                  \
                    float acc = 0.f;                                                                \
                    for (int64_t l = 0; l < ig; l++) acc += Hii[j * ig + l] * y[l];                 \
                    Hy[j] = acc;                                                                    \
                    lin[j] = 2.f * so * (acc - b[j]);                                               \
                }                                                                                   \
                const float *ct = cbT + m * ig * K;                                                 \
                const float *nbm = nb + (i * M + m) * K;                                            \
                const float s2 = so * so;                                                           \
                for (int64_t k = 0; k < K; k++) cost[k] = s2 * nbm[k];                              \
                for (int64_t j = 0; j < ig; j++) {                                                  \
                    const float lj = lin[j];                                                        \
                    const float *restrict cj = ct + j * K;                                          \
                    for (int64_t k = 0; k < K; k++) cost[k] += lj * cj[k];                          \
                }                                                                                   \
                int32_t best = cur[m];                                                              \
                float bv = cost[best];                                                              \
                for (int64_t k = 0; k < K; k++)                                                     \
                    if (cost[k] < bv) { bv = cost[k]; best = (int32_t)k; }                          \
                if (best != cur[m]) { cur[m] = best; changed = 1; nchg++; }                         \
                const float *nw = cb + (m * K + best) * ig;                                         \
                for (int64_t j = 0; j < ig; j++) y[j] += so * nw[j];                                \
            }                                                                                       \
            if (changed) {                                                                          \
                float *Ro = R + o * in;                                                             \
                for (int64_t j = 0; j < ig; j++) {                                                  \
                    const float dj = y[j] - x0[j];                                                  \
                    if (dj == 0.f) continue;                                                        \
                    Ro[c0 + j] -= dj;                                                               \
                    const float *restrict Hr = H + (c0 + j) * in;                                   \
                    for (int64_t c = 0; c < in; c++) Go[c] -= dj * Hr[c];                           \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }

static int64_t sweep_portable(int64_t o0, int64_t o1, int64_t in, int64_t ig, int64_t M, int64_t K, const float *H,
                              float *G_, float *R, int32_t *codes, const float *cb, const float *cbT, const float *nb,
                              const float *s, float *cost) {
    const int64_t ng = in / ig;
    int64_t nchg = 0;
    SWEEP_ROW_BODY
    return nchg;
}
AVX2_FN static int64_t sweep_avx2(int64_t o0, int64_t o1, int64_t in, int64_t ig, int64_t M, int64_t K, const float *H,
                                  float *G_, float *R, int32_t *codes, const float *cb, const float *cbT,
                                  const float *nb, const float *s, float *cost) {
    const int64_t ng = in / ig;
    int64_t nchg = 0;
    SWEEP_ROW_BODY
    return nchg;
}

#define TILE 16
int64_t pq_aqlm_sweep(int64_t out, int64_t in, int64_t ig, int64_t M, int64_t K, const float *H, float *G_, float *R,
                      int32_t *codes, const float *cb, const float *cbT, const float *nb, const float *s,
                      int64_t nthreads, int64_t simd) {
    if (ig > 64 || ig < 1) return -1;
    const int64_t ntiles = (out + TILE - 1) / TILE;
    const int64_t nt = nthreads > 0 ? nthreads : 1;
    int64_t total = 0;
    int failed = 0;
#pragma omp parallel num_threads((int)nt) if (nt > 1) reduction(+ : total)
    {
        float *cost = (float *)malloc(sizeof(float) * (size_t)K);
        if (!cost) {
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < ntiles; t++) {
                const int64_t o0 = t * TILE, o1 = (o0 + TILE < out) ? o0 + TILE : out;
                if (simd >= 1) total += sweep_avx2(o0, o1, in, ig, M, K, H, G_, R, codes, cb, cbT, nb, s, cost);
                else total += sweep_portable(o0, o1, in, ig, M, K, H, G_, R, codes, cb, cbT, nb, s, cost);
            }
            free(cost);
        }
    }
    return failed ? -2 : total;
}
