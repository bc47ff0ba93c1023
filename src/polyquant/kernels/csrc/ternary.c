/* polyquant: ternary weights {-1, 0, +1} times int8 activations (BitNet b1.58's BitLinear), integer
 * accumulation, with the activation rule fused in.
 *
 * Weight layout (built by polyquant.kernels.cpu_ternary.pack_ternary): codes c = w + 1 in {0, 1, 2}, rows
 * [N][Kp] with Kp = K rounded up to 64 (padding code 1 = weight 0); every run of 64 codes c[0..63] of a
 * row is 16 bytes, byte j = c[j] | c[16 + j] << 2 | c[32 + j] << 4 | c[48 + j] << 6. So
 * (byte >> 2i) & 3 of the 16 bytes are the codes of columns 16i .. 16i + 15, in order.
 *
 * Activation rule (transformers' BitLinear.activation_quant, per token = per row of x, float32):
 *   xs = 127 / max(max_k |x[k]|, 1e-5) (as PyTorch evaluates it: (1 / max) * 127);  q[k] = clamp(round_half_even(x[k] * xs), -128, 127)
 * Products: acc[n] = sum_k q[k] * (c[n][k] - 1) = sum_k q[k] * c[n][k] - sum_k q[k], exact in int32
 * (|acc| <= 128 * K). Output (BitLinear.post_quant_process): y[n] = (float)acc / (xs * ws[n]) with ws
 * the quantization multiplier (1 / mean|W|; one value, or one per output row).
 *
 * Code paths: AVX-512 VNNI (vpdpbusd: unsigned codes x signed activations, 4 products summed into int32),
 * AVX-512BW and AVX2 (vpmaddubsw into int16, at most 2 * 2 * 128 = 512 per lane, then vpmaddwd with ones),
 * and portable C. Threads: OpenMP over output rows when nthreads > 1.
 */
#include <math.h>
#include <stdlib.h>

#include "pq_common.h"

/* the best code path this CPU runs: 3 = AVX-512 VNNI, 1 = AVX-512BW, 2 = AVX2, 0 = portable C */
int pq_ternary_simd_level(void) {
#ifdef PQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
        if (__builtin_cpu_supports("avx512vnni")) return 3;
        return 1;
    }
    if (__builtin_cpu_supports("avx2")) return 2;
#endif
    return 0;
}

/* ---- activation rule --------------------------------------------------------------------- */
/* one row: q[0..Kp) (zero padded), returns xs and stores sum(q) */
static float quant_row(int64_t K, int64_t Kp, const float *x, int8_t *q, int32_t *qsum) {
    float m = 0.f;
    for (int64_t k = 0; k < K; k++) {
        const float a = fabsf(x[k]);
        m = a > m ? a : m;
    }
    if (!(m >= 1e-5f)) m = 1e-5f; /* clamp(min=1e-5) */
    const float xs = (1.f / m) * 127.f; /* torch's 127 / t is reciprocal(t) * 127 */
    int32_t s = 0;
    for (int64_t k = 0; k < K; k++) {
        float v = nearbyintf(x[k] * xs); /* round half to even (default rounding mode), as torch.round */
        v = v < -128.f ? -128.f : (v > 127.f ? 127.f : v);
        q[k] = (int8_t)v;
        s += (int32_t)q[k];
    }
    for (int64_t k = K; k < Kp; k++) q[k] = 0;
    *qsum = s;
    return xs;
}

/* ---- portable ---------------------------------------------------------------------------- */
static int32_t dot_portable(int64_t Kp, const int8_t *q, const uint8_t *w) {
    int32_t acc = 0;
    for (int64_t b = 0; b < Kp; b += 64) {
        const uint8_t *p = w + b / 4;
        const int8_t *qb = q + b;
        for (int j = 0; j < 16; j++) {
            const uint8_t v = p[j];
            acc += (int32_t)qb[j] * (v & 3) + (int32_t)qb[16 + j] * ((v >> 2) & 3) +
                   (int32_t)qb[32 + j] * ((v >> 4) & 3) + (int32_t)qb[48 + j] * (v >> 6);
        }
    }
    return acc;
}

static void rows_portable(int64_t n0, int64_t n1, int64_t Kp, const int8_t *q, const uint8_t *w, int32_t *acc) {
    for (int64_t n = n0; n < n1; n++) acc[n] = dot_portable(Kp, q, w + n * (Kp / 4));
}

#ifdef PQ_X86
/* ---- AVX2 -------------------------------------------------------------------------------- */
__attribute__((target("avx2"))) static inline __m256i block_avx2(const uint8_t *p, const int8_t *qb, __m256i mask) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    const __m256i V = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 2), 1);
    const __m256i c01 = _mm256_and_si256(V, mask);                        /* columns 0..15 | 16..31 */
    const __m256i c23 = _mm256_and_si256(_mm256_srli_epi16(V, 4), mask); /* 32..47 | 48..63 */
    const __m256i p0 = _mm256_maddubs_epi16(c01, _mm256_loadu_si256((const __m256i *)qb));
    const __m256i p1 = _mm256_maddubs_epi16(c23, _mm256_loadu_si256((const __m256i *)(qb + 32)));
    return _mm256_add_epi16(p0, p1); /* |.| <= 4 * 2 * 128 */
}

__attribute__((target("avx2"))) static inline int32_t hsum_avx2(__m256i a) {
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    return _mm_cvtsi128_si32(h);
}

/* The body of a rows_* function (n0, n1, Kp, q, w, acc in scope): four weight rows per pass (the activation
   loads shared, four weight streams in flight, the next four rows prefetched), then the rest one at a time.
   VEC: the accumulator type, zero ZERO; X x = XLOAD(q + b): the activation operand of block b;
   STEP(a, p, x): a plus the products of the 64 codes at p with x; SUM(a): a's int32 total. */
#define TERNARY_ROWS(VEC, ZERO, X, XLOAD, STEP, SUM)                                                         \
    const int64_t kb = Kp / 4;                                                                              \
    int64_t n = n0;                                                                                         \
    for (; n + 4 <= n1; n += 4) {                                                                           \
        const uint8_t *w0 = w + n * kb;                                                                     \
        VEC a0 = ZERO, a1 = a0, a2 = a0, a3 = a0;                                                           \
        for (int64_t b = 0; b < Kp; b += 64) {                                                              \
            const uint8_t *p = w0 + b / 4;                                                                  \
            pq_prefetch_next4(p, kb);                                                                       \
            const X x = XLOAD(q + b);                                                                       \
            a0 = STEP(a0, p, x);                                                                            \
            a1 = STEP(a1, p + kb, x);                                                                       \
            a2 = STEP(a2, p + 2 * kb, x);                                                                   \
            a3 = STEP(a3, p + 3 * kb, x);                                                                   \
        }                                                                                                   \
        acc[n] = SUM(a0);                                                                                   \
        acc[n + 1] = SUM(a1);                                                                               \
        acc[n + 2] = SUM(a2);                                                                               \
        acc[n + 3] = SUM(a3);                                                                               \
    }                                                                                                       \
    for (; n < n1; n++) {                                                                                   \
        const uint8_t *w0 = w + n * kb;                                                                     \
        VEC a0 = ZERO;                                                                                      \
        for (int64_t b = 0; b < Kp; b += 64) a0 = STEP(a0, w0 + b / 4, XLOAD(q + b));                       \
        acc[n] = SUM(a0);                                                                                   \
    }

#define Q_PTR(qb) (qb) /* AVX2 reads the activations inside block_avx2 */
#define STEP_AVX2(a, p, qb) _mm256_add_epi32(a, _mm256_madd_epi16(block_avx2(p, qb, mask), ones))
__attribute__((target("avx2"))) static void rows_avx2(int64_t n0, int64_t n1, int64_t Kp, const int8_t *q,
                                                     const uint8_t *w, int32_t *acc) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    TERNARY_ROWS(__m256i, _mm256_setzero_si256(), int8_t *, Q_PTR, STEP_AVX2, hsum_avx2)
}

/* ---- AVX-512 (BW; VNNI) ------------------------------------------------------------------ */
/* the 64 codes of one block in column order: the 16 bytes broadcast to four lanes, lane i shifted by 2i */
#define PQ_AVX512 "avx512f,avx512bw"
__attribute__((target(PQ_AVX512))) static inline __m512i codes_avx512(const uint8_t *p, __m512i shifts, __m512i mask) {
    const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p));
    return _mm512_and_si512(_mm512_srlv_epi64(v, shifts), mask);
}

#define Q_LOAD512(qb) _mm512_loadu_si512((const void *)(qb))
#define STEP_AVX512BW(a, p, x) \
    _mm512_add_epi32(a, _mm512_madd_epi16(_mm512_maddubs_epi16(codes_avx512(p, shifts, mask), x), ones))
__attribute__((target(PQ_AVX512))) static void rows_avx512bw(int64_t n0, int64_t n1, int64_t Kp, const int8_t *q,
                                                            const uint8_t *w, int32_t *acc) {
    const __m512i mask = _mm512_set1_epi8(3), ones = _mm512_set1_epi16(1);
    const __m512i shifts = _mm512_set_epi64(6, 6, 4, 4, 2, 2, 0, 0);
    TERNARY_ROWS(__m512i, _mm512_setzero_si512(), __m512i, Q_LOAD512, STEP_AVX512BW, _mm512_reduce_add_epi32)
}

#define PQ_VNNI "avx512f,avx512bw,avx512vnni"
#define STEP_VNNI(a, p, x) _mm512_dpbusd_epi32(a, codes_avx512(p, shifts, mask), x)
__attribute__((target(PQ_VNNI))) static void rows_vnni(int64_t n0, int64_t n1, int64_t Kp, const int8_t *q,
                                                      const uint8_t *w, int32_t *acc) {
    const __m512i mask = _mm512_set1_epi8(3);
    const __m512i shifts = _mm512_set_epi64(6, 6, 4, 4, 2, 2, 0, 0);
    TERNARY_ROWS(__m512i, _mm512_setzero_si512(), __m512i, Q_LOAD512, STEP_VNNI, _mm512_reduce_add_epi32)
}
#endif

static void rows(int simd, int64_t n0, int64_t n1, int64_t Kp, const int8_t *q, const uint8_t *w, int32_t *acc) {
#ifdef PQ_X86
    if (simd == 3) { rows_vnni(n0, n1, Kp, q, w, acc); return; }
    if (simd == 1) { rows_avx512bw(n0, n1, Kp, q, w, acc); return; }
    if (simd == 2) { rows_avx2(n0, n1, Kp, q, w, acc); return; }
#endif
    rows_portable(n0, n1, Kp, q, w, acc);
}

/* ---- entry points ------------------------------------------------------------------------ */
/* Integer products only: acc[M][N] = q[M][Kp] (int8, zero padded) @ (codes - 1)^T, int32. */
void pq_ternary_int_mm(int64_t M, int64_t N, int64_t Kp, const int8_t *q, const uint8_t *w, int32_t *acc,
                       int64_t nthreads, int64_t simd) {
    for (int64_t m = 0; m < M; m++) {
        int32_t s = 0;
        for (int64_t k = 0; k < Kp; k++) s += q[m * Kp + k];
        PQ_FOR_CHUNKS(n0, n1, N, 16, nthreads) rows((int)simd, n0, n1, Kp, q + m * Kp, w, acc + m * N);
        for (int64_t n = 0; n < N; n++) acc[m * N + n] -= s;
    }
}

/* The whole BitLinear: y[M][N] (row stride ldy) = BitLinear(x[M][K] (row stride ldx)) without bias.
   ws: nws = 1 (per tensor) or N (per output row) quantization multipliers. scratch: M * Kp bytes. */
void pq_ternary_linear(int64_t M, int64_t N, int64_t K, int64_t Kp, const float *x, int64_t ldx, const uint8_t *w,
                       const float *ws, int64_t nws, float *y, int64_t ldy, int8_t *scratch, int64_t nthreads,
                       int64_t simd) {
    int32_t *acc = (int32_t *)malloc(sizeof(int32_t) * (size_t)N);
    if (!acc) return;
    for (int64_t m = 0; m < M; m++) {
        int8_t *q = scratch + m * Kp;
        int32_t s;
        const float xs = quant_row(K, Kp, x + m * ldx, q, &s);
        PQ_FOR_CHUNKS(n0, n1, N, 16, nthreads) rows((int)simd, n0, n1, Kp, q, w, acc);
        float *yr = y + m * ldy;
        if (nws == 1) {
            const float d = xs * ws[0];
            for (int64_t n = 0; n < N; n++) yr[n] = (float)(acc[n] - s) / d;
        } else {
            for (int64_t n = 0; n < N; n++) yr[n] = (float)(acc[n] - s) / (xs * ws[n]);
        }
    }
    free(acc);
}

/* The activation rule alone (for the prefill path and tests): q[M][Kp] int8, xs[M] float32. */
void pq_ternary_quant(int64_t M, int64_t K, int64_t Kp, const float *x, int64_t ldx, int8_t *q, float *xs) {
    for (int64_t m = 0; m < M; m++) {
        int32_t s;
        xs[m] = quant_row(K, Kp, x + m * ldx, q + m * Kp, &s);
    }
}

/* Dense int8 weights (codes - 1) [N][K] from the packed layout (for an int8 x int8 GEMM at prefill). */
void pq_ternary_unpack(int64_t N, int64_t K, int64_t Kp, const uint8_t *w, int8_t *out, int64_t nthreads) {
#pragma omp parallel for schedule(static) num_threads(PQ_THREADS(nthreads)) if (nthreads > 1)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *p = w + n * (Kp / 4);
        int8_t *o = out + n * K;
        for (int64_t k = 0; k < K; k++) {
            const int64_t b = k / 64, r = k % 64;
            o[k] = (int8_t)(((p[b * 16 + (r % 16)] >> (2 * (r / 16))) & 3) - 1);
        }
    }
}

/* Dense float32 weights (codes - 1) [N][K] from the packed layout (prefill: a float GEMM on exact integers). */
void pq_ternary_unpack_f32(int64_t N, int64_t K, int64_t Kp, const uint8_t *w, float *out, int64_t nthreads) {
    static const float val[4] = {-1.f, 0.f, 1.f, 2.f};
#pragma omp parallel for schedule(static) num_threads(PQ_THREADS(nthreads)) if (nthreads > 1)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *p = w + n * (Kp / 4);
        float *o = out + n * K;
        for (int64_t b = 0; b < Kp; b += 64) {
            const uint8_t *pb = p + b / 4;
            if (b + 64 <= K) {
                float *ob = o + b;
                for (int j = 0; j < 16; j++) {
                    const uint8_t v = pb[j];
                    ob[j] = val[v & 3];
                    ob[16 + j] = val[(v >> 2) & 3];
                    ob[32 + j] = val[(v >> 4) & 3];
                    ob[48 + j] = val[v >> 6];
                }
            } else {
                for (int64_t k = b; k < K; k++) {
                    const int64_t r = k - b;
                    o[k] = val[(pb[r % 16] >> (2 * (r / 16))) & 3];
                }
            }
        }
    }
}
