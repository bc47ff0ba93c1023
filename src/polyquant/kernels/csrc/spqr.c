/* polyquant: SpQR weights (2- to 4-bit codes in groups of 16 input columns, float scale and zero per
 * group - the decoded two-level statistics - plus a CSR matrix of float outliers) times float
 * activations.
 *
 * Layout (built by polyquant.kernels.cpu_spqr.prepare): input columns in processing order (the
 * act-order permutation applied once), padded to Kp = 16 * G columns; codes [N][Kp / 2] bytes, group
 * g of row n is 8 bytes at w + n * Kp / 2 + 8 g, byte i = c[2i] | c[2i + 1] << 4; scale s and zero z
 * float [N][G]; outliers: row_offsets int32 [N + 1], col int32 [nnz] (processing-order column),
 * val float [nnz]. Weight (n, k) = (code - z[n][k / 16]) * s[n][k / 16] + its outlier, the value
 * polyquant's reference dequantization computes (float32). The activations x [M][Kp] arrive
 * permuted and zero-padded.
 *
 * AVX-512: per group a 16-entry table (t - z) * s in one register, _mm512_permutexvar_ps looks up
 * the 16 codes; AVX2 + FMA: the codes widened to 2 x 8 floats, (q - z) * s; portable C elsewhere.
 * The sparse part is a CSR product per row after the dense dot. Threads: OpenMP over output rows
 * when nthreads > 1.
 */
#include "pq_common.h"

#define MB 4 /* activation rows per pass over a weight row */

/* the best code path this CPU runs: 1 = AVX-512F, 2 = AVX2 + FMA, 0 = portable C */
int pq_spqr_simd_level(void) { return pq_f32_simd_level(1); }

static inline float sparse_dot(const int32_t *ro, const int32_t *col, const float *val, int64_t n,
                               const float *xr) {
    float t = 0.f;
    for (int32_t e = ro[n]; e < ro[n + 1]; e++) t += val[e] * xr[col[e]];
    return t;
}

/* ---- portable ---------------------------------------------------------------------------- */
static void rows_portable(int64_t M, int64_t n0, int64_t n1, int64_t Kp, const float *x, const uint8_t *w,
                          const float *s, const float *z, const int32_t *ro, const int32_t *col,
                          const float *val, float *y, int64_t ldy) {
    const int64_t G = Kp / 16;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (Kp / 2);
        PQ_FOR_MBLOCKS(m0, mb, M, MB) {
            float acc[MB] = {0};
            for (int64_t g = 0; g < G; g++) {
                const float sc = s[n * G + g], zp = z[n * G + g];
                float v[16];
                for (int i = 0; i < 8; i++) {
                    v[2 * i] = ((float)(wr[8 * g + i] & 15) - zp) * sc;
                    v[2 * i + 1] = ((float)(wr[8 * g + i] >> 4) - zp) * sc;
                }
                for (int64_t m = 0; m < mb; m++) {
                    const float *xr = x + (m0 + m) * Kp + 16 * g;
                    float t = 0.f;
                    for (int i = 0; i < 16; i++) t += v[i] * xr[i];
                    acc[m] += t;
                }
            }
            for (int64_t m = 0; m < mb; m++)
                y[(m0 + m) * ldy + n] = acc[m] + sparse_dot(ro, col, val, n, x + (m0 + m) * Kp);
        }
    }
}

static void dequant_portable(int64_t n0, int64_t n1, int64_t Kp, const uint8_t *w, const float *s,
                             const float *z, const int32_t *ro, const int32_t *col, const float *val, float *out) {
    const int64_t G = Kp / 16;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (Kp / 2);
        float *o = out + n * Kp;
        for (int64_t g = 0; g < G; g++) {
            const float sc = s[n * G + g], zp = z[n * G + g];
            for (int i = 0; i < 8; i++) {
                o[16 * g + 2 * i] = ((float)(wr[8 * g + i] & 15) - zp) * sc;
                o[16 * g + 2 * i + 1] = ((float)(wr[8 * g + i] >> 4) - zp) * sc;
            }
        }
        for (int32_t e = ro[n]; e < ro[n + 1]; e++) o[col[e]] += val[e];
    }
}

#ifdef PQ_X86
/* ---- AVX-512 ----------------------------------------------------------------------------- */
__attribute__((target("avx512f"))) static inline __m512i codes16(const uint8_t *p) {
    const __m128i v = _mm_loadl_epi64((const __m128i *)p);
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
}

__attribute__((target("avx512f"))) static void rows_avx512(int64_t M, int64_t n0, int64_t n1, int64_t Kp,
                                                          const float *x, const uint8_t *w, const float *s,
                                                          const float *z, const int32_t *ro, const int32_t *col,
                                                          const float *val, float *y, int64_t ldy) {
    const int64_t G = Kp / 16;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (Kp / 2);
        const float *sr = s + n * G, *zr = z + n * G;
        PQ_FOR_MBLOCKS(m0, mb, M, MB) {
            __m512 acc[MB];
            for (int m = 0; m < MB; m++) acc[m] = _mm512_setzero_ps();
            if (mb == 1) {
                const float *xr = x + m0 * Kp;
                __m512 a1 = _mm512_setzero_ps();
                int64_t g = 0;
                for (; g + 1 < G; g += 2) { /* two groups per step: two independent chains */
                    const __m512 t0 = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zr[g])), _mm512_set1_ps(sr[g]));
                    const __m512 t1 = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zr[g + 1])),
                                                    _mm512_set1_ps(sr[g + 1]));
                    const __m512 w0 = _mm512_permutexvar_ps(codes16(wr + 8 * g), t0);
                    const __m512 w1 = _mm512_permutexvar_ps(codes16(wr + 8 * g + 8), t1);
                    acc[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr + 16 * g), acc[0]);
                    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16 * g + 16), a1);
                }
                for (; g < G; g++) {
                    const __m512 t0 = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zr[g])), _mm512_set1_ps(sr[g]));
                    acc[0] = _mm512_fmadd_ps(_mm512_permutexvar_ps(codes16(wr + 8 * g), t0),
                                             _mm512_loadu_ps(xr + 16 * g), acc[0]);
                }
                acc[0] = _mm512_add_ps(acc[0], a1);
            } else {
                for (int64_t g = 0; g < G; g++) {
                    const __m512 t = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zr[g])), _mm512_set1_ps(sr[g]));
                    const __m512 wv = _mm512_permutexvar_ps(codes16(wr + 8 * g), t);
                    for (int64_t m = 0; m < mb; m++)
                        acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (m0 + m) * Kp + 16 * g), acc[m]);
                }
            }
            for (int64_t m = 0; m < mb; m++)
                y[(m0 + m) * ldy + n] = _mm512_reduce_add_ps(acc[m]) + sparse_dot(ro, col, val, n, x + (m0 + m) * Kp);
        }
    }
}

__attribute__((target("avx512f"))) static void dequant_avx512(int64_t n0, int64_t n1, int64_t Kp, const uint8_t *w,
                                                             const float *s, const float *z, const int32_t *ro,
                                                             const int32_t *col, const float *val, float *out) {
    const int64_t G = Kp / 16;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (Kp / 2);
        float *o = out + n * Kp;
        for (int64_t g = 0; g < G; g++) {
            const __m512 t = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z[n * G + g])), _mm512_set1_ps(s[n * G + g]));
            _mm512_storeu_ps(o + 16 * g, _mm512_permutexvar_ps(codes16(wr + 8 * g), t));
        }
        for (int32_t e = ro[n]; e < ro[n + 1]; e++) o[col[e]] += val[e];
    }
}

/* ---- AVX2 + FMA -------------------------------------------------------------------------- */
/* codes 0..7 and 8..15 of a group as floats: each 32-bit half of the 8 bytes holds 8 nibbles (code 2i in
   the low nibble of byte i), broadcast and shifted per lane - no shuffles */
__attribute__((target("avx2,fma"))) static inline void codes8x2(const uint8_t *p, __m256 *a, __m256 *b) {
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i mask = _mm256_set1_epi32(15);
    const __m256i lo = _mm256_set1_epi32(*(const int32_t *)p), hi = _mm256_set1_epi32(*(const int32_t *)(p + 4));
    *a = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(lo, sh), mask));
    *b = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(hi, sh), mask));
}

/* The decode path factors the scale out of each group: sum_k (q_k - z) s x_k = s (q . x) - s z sum(x), with
   mz = -s z per group and xs = the per-group sums of the activations (computed once per call by the
   caller); the mz . xs term is one vector dot per row. Two groups per step, independent accumulators. */
__attribute__((target("avx2,fma"))) static void rows_avx2(int64_t M, int64_t n0, int64_t n1, int64_t Kp,
                                                         const float *x, const uint8_t *w, const float *s,
                                                         const float *mz, const float *xs, const int32_t *ro,
                                                         const int32_t *col, const float *val, float *y, int64_t ldy) {
    const int64_t G = Kp / 16;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (Kp / 2);
        const float *sr = s + n * G, *mr = mz + n * G;
        PQ_FOR_MBLOCKS(m0, mb, M, MB) {
            float res[MB];
            if (mb == 1) {
                const float *xr = x + m0 * Kp;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                int64_t g = 0;
                for (; g + 1 < G; g += 2) {
                    __m256 qa, qb, qc, qd;
                    codes8x2(wr + 8 * g, &qa, &qb);
                    codes8x2(wr + 8 * g + 8, &qc, &qd);
                    const float *xg = xr + 16 * g;
                    __m256 t0 = _mm256_mul_ps(qa, _mm256_loadu_ps(xg));
                    __m256 t1 = _mm256_mul_ps(qc, _mm256_loadu_ps(xg + 16));
                    t0 = _mm256_fmadd_ps(qb, _mm256_loadu_ps(xg + 8), t0);
                    t1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(xg + 24), t1);
                    a0 = _mm256_fmadd_ps(t0, _mm256_broadcast_ss(sr + g), a0);
                    a1 = _mm256_fmadd_ps(t1, _mm256_broadcast_ss(sr + g + 1), a1);
                }
                for (; g < G; g++) {
                    __m256 qa, qb;
                    codes8x2(wr + 8 * g, &qa, &qb);
                    __m256 t0 = _mm256_mul_ps(qa, _mm256_loadu_ps(xr + 16 * g));
                    t0 = _mm256_fmadd_ps(qb, _mm256_loadu_ps(xr + 16 * g + 8), t0);
                    a0 = _mm256_fmadd_ps(t0, _mm256_broadcast_ss(sr + g), a0);
                }
                res[0] = pq_hsum8_ps(_mm256_add_ps(a0, a1));
            } else {
                __m256 acc[MB];
                for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps();
                for (int64_t g = 0; g < G; g++) {
                    __m256 qa, qb;
                    codes8x2(wr + 8 * g, &qa, &qb);
                    const __m256 sb = _mm256_broadcast_ss(sr + g);
                    for (int64_t m = 0; m < mb; m++) {
                        const float *xr = x + (m0 + m) * Kp + 16 * g;
                        __m256 t = _mm256_mul_ps(qa, _mm256_loadu_ps(xr));
                        t = _mm256_fmadd_ps(qb, _mm256_loadu_ps(xr + 8), t);
                        acc[m] = _mm256_fmadd_ps(t, sb, acc[m]);
                    }
                }
                for (int64_t m = 0; m < mb; m++) res[m] = pq_hsum8_ps(acc[m]);
            }
            for (int64_t m = 0; m < mb; m++) {
                const float *xsr = xs + (m0 + m) * G;
                __m256 zacc = _mm256_setzero_ps();
                int64_t g = 0;
                for (; g + 8 <= G; g += 8) zacc = _mm256_fmadd_ps(_mm256_loadu_ps(mr + g), _mm256_loadu_ps(xsr + g), zacc);
                float zt = pq_hsum8_ps(zacc);
                for (; g < G; g++) zt += mr[g] * xsr[g];
                y[(m0 + m) * ldy + n] = res[m] + zt + sparse_dot(ro, col, val, n, x + (m0 + m) * Kp);
            }
        }
    }
}

__attribute__((target("avx2,fma"))) static void dequant_avx2(int64_t n0, int64_t n1, int64_t Kp, const uint8_t *w,
                                                            const float *s, const float *z, const int32_t *ro,
                                                            const int32_t *col, const float *val, float *out) {
    const int64_t G = Kp / 16;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (Kp / 2);
        float *o = out + n * Kp;
        for (int64_t g = 0; g < G; g++) {
            const __m256 zb = _mm256_set1_ps(z[n * G + g]), sb = _mm256_set1_ps(s[n * G + g]);
            __m256 qa, qb;
            codes8x2(wr + 8 * g, &qa, &qb);
            _mm256_storeu_ps(o + 16 * g, _mm256_mul_ps(_mm256_sub_ps(qa, zb), sb));
            _mm256_storeu_ps(o + 16 * g + 8, _mm256_mul_ps(_mm256_sub_ps(qb, zb), sb));
        }
        for (int32_t e = ro[n]; e < ro[n + 1]; e++) o[col[e]] += val[e];
    }
}
#endif

/* y [M][ldy] = x [M][Kp] @ W^T for rows 0..N-1 (mz = -s z [N][G] and xs = per-group sums of x [M][G]
   serve the AVX2 path). simd: 1 = AVX-512, 2 = AVX2, 0 = portable (the
   caller passes at most pq_spqr_simd_level's). */
void pq_spqr_mm(int64_t M, int64_t N, int64_t Kp, const float *x, const uint8_t *w, const float *s, const float *z,
                const float *mz, const float *xs, const int32_t *ro, const int32_t *col, const float *val, float *y, int64_t ldy, int64_t nthreads,
                int64_t simd) {
    PQ_FOR_CHUNKS(n0, n1, N, 16, nthreads) {
#ifdef PQ_X86
        if (simd == 1) { rows_avx512(M, n0, n1, Kp, x, w, s, z, ro, col, val, y, ldy); continue; }
        if (simd == 2) { rows_avx2(M, n0, n1, Kp, x, w, s, mz, xs, ro, col, val, y, ldy); continue; }
#endif
        rows_portable(M, n0, n1, Kp, x, w, s, z, ro, col, val, y, ldy);
    }
}

/* out [N][Kp]: the dense float32 weight in processing order, outliers added. */
void pq_spqr_dequant(int64_t N, int64_t Kp, const uint8_t *w, const float *s, const float *z, const int32_t *ro,
                     const int32_t *col, const float *val, float *out, int64_t nthreads, int64_t simd) {
    PQ_FOR_CHUNKS(n0, n1, N, 16, nthreads) {
#ifdef PQ_X86
        if (simd == 1) { dequant_avx512(n0, n1, Kp, w, s, z, ro, col, val, out); continue; }
        if (simd == 2) { dequant_avx2(n0, n1, Kp, w, s, z, ro, col, val, out); continue; }
#endif
        dequant_portable(n0, n1, Kp, w, s, z, ro, col, val, out);
    }
}
