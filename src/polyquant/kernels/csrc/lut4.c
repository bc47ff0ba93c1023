/* polyquant: 4-bit look-up-table weights (NF4, FP4, any 16-entry code book; integer codes of 1-4 bits with
 * a zero point are the table code - offset) times float activations.
 *
 * Weight layout (built by polyquant.kernels.cpu_lut4.pack_lut4): codes [N][K] become bytes [N][K/2];
 * every run of 32 codes c[0..31] is 16 bytes, byte b = c[b] | c[16 + b] << 4, so one 16-byte load
 * widened to 16 x int32 yields codes 0..15 in the low nibbles and 16..31 after a shift by 4.
 * Scales (and optional zero points): float [N][K/G] (G: inputs per scale, a multiple of 32 dividing K).
 * Value of weight (n, k): (lut[code] - zero[n][k / G]) * scale[n][k / G], as polyquant's reference
 * dequantization computes it. Accumulation is float32.
 *
 * AVX-512: the 16-entry table lives in one register and _mm512_permutexvar_ps looks up 16 codes at
 * once (it reads only the low 4 bits of each index); the table is pre-multiplied by the group's
 * scale (and zero). AVX2: two 8-entry halves and a blend on bit 3. Other CPUs run the portable loop. Threads: OpenMP over output rows when nthreads > 1.
 */
#include "pq_common.h"

#define MB 4 /* activation rows per pass over a weight row */

/* the best code path this CPU runs: 1 = AVX-512F, 2 = AVX2 + FMA, 0 = portable C */
int pq_lut4_simd_level(void) { return pq_f32_simd_level(1); }

/* ---- portable ---------------------------------------------------------------------------- */
static void rows_portable(int64_t M, int64_t n0, int64_t n1, int64_t K, int64_t G, const float *x,
                          int64_t ldx, const uint8_t *w, const float *s, const float *z, const float *lut, float *y,
                          int64_t ldy) {
    const int64_t ng = K / G, kb = K / 2;
    float vals[32];
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * kb;
        PQ_FOR_MBLOCKS(m0, mb, M, MB) {
            float acc[MB] = {0};
            for (int64_t g = 0; g < ng; g++) {
                const float sc = s[n * ng + g], zp = z ? z[n * ng + g] : 0.f;
                float tab[16];
                for (int i = 0; i < 16; i++) tab[i] = (lut[i] - zp) * sc;
                float part[MB] = {0};
                for (int64_t c = g * G; c < (g + 1) * G; c += 32) {
                    const uint8_t *b = wr + c / 2;
                    for (int i = 0; i < 16; i++) {
                        vals[i] = tab[b[i] & 15];
                        vals[16 + i] = tab[b[i] >> 4];
                    }
                    for (int64_t m = 0; m < mb; m++) {
                        const float *xr = x + (m0 + m) * ldx + c;
                        float t = 0.f;
                        for (int i = 0; i < 32; i++) t += xr[i] * vals[i];
                        part[m] += t;
                    }
                }
                for (int64_t m = 0; m < mb; m++) acc[m] += part[m];
            }
            for (int64_t m = 0; m < mb; m++) y[(m0 + m) * ldy + n] = acc[m];
        }
    }
}

static void dequant_portable(int64_t n0, int64_t n1, int64_t K, int64_t G, const uint8_t *w,
                             const float *s, const float *z, const float *lut, float *out) {
    const int64_t ng = K / G, kb = K / 2;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t c = 0; c < K; c += 32) {
            const uint8_t *b = w + n * kb + c / 2;
            const float sc = s[n * ng + c / G], zp = z ? z[n * ng + c / G] : 0.f;
            float *o = out + n * K + c;
            for (int i = 0; i < 16; i++) {
                o[i] = (lut[b[i] & 15] - zp) * sc;
                o[16 + i] = (lut[b[i] >> 4] - zp) * sc;
            }
        }
    }
}

/* ---- AVX-512 ----------------------------------------------------------------------------- */
#ifdef PQ_X86
/* the group's table: (lut - zero) * scale, the reference's order of operations (bit-exact values) */
#define TABLE(i) (z ? _mm512_mul_ps(_mm512_sub_ps(table, _mm512_set1_ps(z[i])), _mm512_set1_ps(s[i])) \
               : _mm512_mul_ps(table, _mm512_set1_ps(s[i])))

/* one activation row, four weight rows at a time: four weight streams in flight (memory-level
   parallelism) and eight independent accumulators; the rows after them are prefetched. */
__attribute__((target("avx512f"))) static int64_t gemv4_avx512(int64_t n0, int64_t n1, int64_t K, int64_t G,
                                                            const float *x, const uint8_t *w, const float *s,
                                                            const float *z, const float *lut, float *y) {
    const int64_t ng = K / G, kb = K / 2;
    const __m512 table = _mm512_loadu_ps(lut);
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const uint8_t *w0 = w + n * kb;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(),
               b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            const __m512 t0 = TABLE(n * ng + g);
            const __m512 t1 = TABLE((n + 1) * ng + g);
            const __m512 t2 = TABLE((n + 2) * ng + g);
            const __m512 t3 = TABLE((n + 3) * ng + g);
            for (int64_t c = g * G; c < (g + 1) * G; c += 32) {
                const uint8_t *p = w0 + c / 2;
                pq_prefetch_next4(p, kb);
                const __m512 xl = _mm512_loadu_ps(x + c), xh = _mm512_loadu_ps(x + c + 16);
                __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
                a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(q, t0), xl, a0);
                b0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t0), xh, b0);
                q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + kb)));
                a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(q, t1), xl, a1);
                b1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t1), xh, b1);
                q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 2 * kb)));
                a2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(q, t2), xl, a2);
                b2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t2), xh, b2);
                q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 3 * kb)));
                a3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(q, t3), xl, a3);
                b3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t3), xh, b3);
            }
        }
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
        y[n + 1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
        y[n + 2] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
        y[n + 3] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
    }
    return n;
}

__attribute__((target("avx512f"))) static void rows_avx512(int64_t M, int64_t n0, int64_t n1, int64_t K,
                                                           int64_t G, const float *x, int64_t ldx,
                                                           const uint8_t *w, const float *s, const float *z,
                                                           const float *lut, float *y, int64_t ldy) {
    const int64_t ng = K / G, kb = K / 2;
    const __m512 table = _mm512_loadu_ps(lut);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * kb;
        PQ_FOR_MBLOCKS(m0, mb, M, MB) {
            __m512 acc[MB];
            for (int m = 0; m < MB; m++) acc[m] = _mm512_setzero_ps();
            const float *xr = x + m0 * ldx;
            for (int64_t g = 0; g < ng; g++) {
                const __m512 t = TABLE(n * ng + g);
                for (int64_t c = g * G; c < (g + 1) * G; c += 32) {
                    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wr + c / 2)));
                    const __m512 lo = _mm512_permutexvar_ps(q, t); /* low 4 bits of each index */
                    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t);
                    if (mb == 1) {
                        acc[0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr + c), acc[0]);
                        acc[1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + c + 16), acc[1]);
                    } else {
                        for (int64_t m = 0; m < mb; m++) {
                            const float *xm = xr + m * ldx + c;
                            acc[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xm), acc[m]);
                            acc[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xm + 16), acc[m]);
                        }
                    }
                }
            }
            if (mb == 1) {
                y[m0 * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
            } else {
                for (int64_t m = 0; m < mb; m++) y[(m0 + m) * ldy + n] = _mm512_reduce_add_ps(acc[m]);
            }
        }
    }
}

__attribute__((target("avx512f"))) static void dequant_avx512(int64_t n0, int64_t n1, int64_t K, int64_t G,
                                                              const uint8_t *w, const float *s, const float *z,
                                                              const float *lut, float *out) {
    const int64_t ng = K / G, kb = K / 2;
    const __m512 table = _mm512_loadu_ps(lut);
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t g = 0; g < ng; g++) {
            const __m512 t = TABLE(n * ng + g);
            for (int64_t c = g * G; c < (g + 1) * G; c += 32) {
                const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + n * kb + c / 2)));
                _mm512_storeu_ps(out + n * K + c, _mm512_permutexvar_ps(q, t));
                _mm512_storeu_ps(out + n * K + c + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t));
            }
        }
    }
}

/* ---- AVX2 + FMA -------------------------------------------------------------------------- */
/* 16-entry lookup with 8-lane permutes: entries 0..7 and 8..15 looked up separately, bit 3 of the
   index (moved to the sign bit) picks between them. */
__attribute__((target("avx2,fma"))) static inline __m256 lookup8(__m256i idx, __m256 tlo, __m256 thi) {
    const __m256 a = _mm256_permutevar8x32_ps(tlo, idx), b = _mm256_permutevar8x32_ps(thi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

__attribute__((target("avx2,fma"))) static void rows_avx2(int64_t M, int64_t n0, int64_t n1, int64_t K, int64_t G,
                                                         const float *x, int64_t ldx, const uint8_t *w,
                                                         const float *s, const float *z, const float *lut,
                                                         float *y, int64_t ldy) {
    const int64_t ng = K / G, kb = K / 2;
    const __m256 llo = _mm256_loadu_ps(lut), lhi = _mm256_loadu_ps(lut + 8);
    const __m256i nib = _mm256_set1_epi32(15);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * kb;
        PQ_FOR_MBLOCKS(m0, mb, M, MB) {
            __m256 acc[MB][2];
            for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                const __m256 sc = _mm256_set1_ps(s[n * ng + g]), zp = _mm256_set1_ps(z ? z[n * ng + g] : 0.f);
                const __m256 tlo = _mm256_mul_ps(_mm256_sub_ps(llo, zp), sc);
                const __m256 thi = _mm256_mul_ps(_mm256_sub_ps(lhi, zp), sc);
                for (int64_t c = g * G; c < (g + 1) * G; c += 32) {
                    const uint8_t *p = wr + c / 2;
                    _mm_prefetch((const char *)(p + kb), _MM_HINT_T0);
                    const __m256i q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
                    const __m256i q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
                    const __m256 v0 = lookup8(_mm256_and_si256(q0, nib), tlo, thi);  /* codes 0..7 */
                    const __m256 v1 = lookup8(_mm256_and_si256(q1, nib), tlo, thi);  /* 8..15 */
                    const __m256 v2 = lookup8(_mm256_srli_epi32(q0, 4), tlo, thi);   /* 16..23 */
                    const __m256 v3 = lookup8(_mm256_srli_epi32(q1, 4), tlo, thi);   /* 24..31 */
                    for (int64_t m = 0; m < mb; m++) {
                        const float *xm = x + (m0 + m) * ldx + c;
                        acc[m][0] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xm), acc[m][0]);
                        acc[m][1] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xm + 8), acc[m][1]);
                        acc[m][0] = _mm256_fmadd_ps(v2, _mm256_loadu_ps(xm + 16), acc[m][0]);
                        acc[m][1] = _mm256_fmadd_ps(v3, _mm256_loadu_ps(xm + 24), acc[m][1]);
                    }
                }
            }
            for (int64_t m = 0; m < mb; m++) {
                y[(m0 + m) * ldy + n] = pq_hsum8_ps(_mm256_add_ps(acc[m][0], acc[m][1]));
            }
        }
    }
}

__attribute__((target("avx2,fma"))) static void dequant_avx2(int64_t n0, int64_t n1, int64_t K, int64_t G,
                                                            const uint8_t *w, const float *s, const float *z,
                                                            const float *lut, float *out) {
    const int64_t ng = K / G, kb = K / 2;
    const __m256 llo = _mm256_loadu_ps(lut), lhi = _mm256_loadu_ps(lut + 8);
    const __m256i nib = _mm256_set1_epi32(15);
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t g = 0; g < ng; g++) {
            const __m256 sc = _mm256_set1_ps(s[n * ng + g]), zp = _mm256_set1_ps(z ? z[n * ng + g] : 0.f);
            const __m256 tlo = _mm256_mul_ps(_mm256_sub_ps(llo, zp), sc);
            const __m256 thi = _mm256_mul_ps(_mm256_sub_ps(lhi, zp), sc);
            for (int64_t c = g * G; c < (g + 1) * G; c += 32) {
                const uint8_t *p = w + n * kb + c / 2;
                float *o = out + n * K + c;
                const __m256i q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
                const __m256i q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
                _mm256_storeu_ps(o, lookup8(_mm256_and_si256(q0, nib), tlo, thi));
                _mm256_storeu_ps(o + 8, lookup8(_mm256_and_si256(q1, nib), tlo, thi));
                _mm256_storeu_ps(o + 16, lookup8(_mm256_srli_epi32(q0, 4), tlo, thi));
                _mm256_storeu_ps(o + 24, lookup8(_mm256_srli_epi32(q1, 4), tlo, thi));
            }
        }
    }
}
#endif

/* ---- entry points ------------------------------------------------------------------------ */
/* y[M][N] (row stride ldy) = x[M][K] (row stride ldx) @ W^T (z may be NULL).
   simd: 1 = AVX-512, 2 = AVX2, 0 = portable (the caller passes at most pq_lut4_simd_level's). */
void pq_lut4_mm(int64_t M, int64_t N, int64_t K, int64_t G, const float *x, int64_t ldx, const uint8_t *w,
                const float *s, const float *z, const float *lut, float *y, int64_t ldy, int64_t nthreads,
                int64_t simd) {
    PQ_FOR_CHUNKS(n0, n1, N, 16, nthreads) {
#ifdef PQ_X86
        if (simd == 1) {
            int64_t n = n0;
            if (M == 1) n = gemv4_avx512(n0, n1, K, G, x, w, s, z, lut, y);
            if (n < n1) rows_avx512(M, n, n1, K, G, x, ldx, w, s, z, lut, y, ldy);
            continue;
        }
        if (simd == 2) {
            rows_avx2(M, n0, n1, K, G, x, ldx, w, s, z, lut, y, ldy);
            continue;
        }
#endif
        rows_portable(M, n0, n1, K, G, x, ldx, w, s, z, lut, y, ldy);
    }
}

/* out[N][K] = (lut[code] - zero) * scale, float32 (z may be NULL: no zero points). */
void pq_lut4_dequant(int64_t N, int64_t K, int64_t G, const uint8_t *w, const float *s, const float *z,
                     const float *lut, float *out, int64_t nthreads, int64_t simd) {
    PQ_FOR_CHUNKS(n0, n1, N, 16, nthreads) {
#ifdef PQ_X86
        if (simd == 1) {
            dequant_avx512(n0, n1, K, G, w, s, z, lut, out);
            continue;
        }
        if (simd == 2) {
            dequant_avx2(n0, n1, K, G, w, s, z, lut, out);
            continue;
        }
#endif
        dequant_portable(n0, n1, K, G, w, s, z, lut, out);
    }
}
