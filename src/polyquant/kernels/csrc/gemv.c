/* polyquant: batch-1 (and few-row) matrix-vector products at the memory limit on AVX2 + FMA CPUs, for
 * integer weights of 1-4 bits and of 8 bits with one scale (and zero point) per group of inputs, float32
 * and bf16 dense weights, and one whole Llama-family decoder layer step built from them (cpu-gemv).
 *
 * Integer weights are stored in a "lanes" layout chosen so that no shuffle is needed to widen the codes
 * to 32-bit lanes: each 32-bit word holds the codes of one AVX2 lane.
 *   4-bit (q4l): per row, blocks of 64 inputs; word i (0..7) of block b holds, in its nibble j (bits
 *                4j..4j+3), the code of input 64 b + 8 j + i.
 *   8-bit (q8l): per row, blocks of 32 inputs; word i of block b holds, in its byte j, the code of input
 *                32 b + 8 j + i.
 * Rows are stored in tiles of 4 (N padded to a multiple of 4 with zero codes and zero scales): the words
 * are [N/4][blocks][4 rows][8 lanes], so a tile's matrix-vector product reads one sequential stream;
 * scales and zero points are [N/4][K/G][4].
 * Codes are the stored unsigned (offset-binary) codes. Weight (n, k) = ((code - off) - zero) * scale of
 * its group, polyquant's reference dequantization (pq_*_dequant reproduces it bit for bit).
 *
 * The products: masking nibble j in place (no shift) leaves code * 16^j, exact as a float; the
 * activation is pre-scaled by 16^-j (a power of two: exact), so each product is code * x exactly as
 * the float product would round. Per group the lanes accumulate sum code * x with FMA, and the
 * group's (off + zero) * sum x and the scale are applied once per group and lane:
 *   y[n] = sum_g s[n][g] * (sum_{k in g} code_k x_k - (off + z[n][g]) * sum_{k in g} x_k)
 * which is the reference's sum reassociated (float32 accumulation; tests bound the difference).
 *
 * Threads: OpenMP over blocks of output rows when nthreads > 1.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "pq_common.h"

#define ROWS_PER_TASK 16

/* the best code path this CPU runs: 2 = AVX2 + FMA, 0 = portable C */
int pq_gemv_simd_level(void) { return pq_f32_simd_level(0); }

/* ---- activation preparation ------------------------------------------------------------- */
/* xp[k] = x[k] * 2^-(bits * j) for the lane position j of input k (the top position unscaled: it is
   shifted down instead of masked), xs[g][i] = sum of x over the inputs of group g in lane i. */
static void prep_x(int64_t K, int64_t G, int bits, const float *x, float *xp, float *xs) {
    const int per = 32 / bits;            /* positions per word: 8 (4-bit) or 4 (8-bit) */
    const int64_t blk = 8 * per;          /* inputs per block: 64 or 32 */
    for (int64_t b = 0; b < K; b += blk) {
        for (int j = 0; j < per; j++) {
            const float f = (j == per - 1) ? 1.0f : ldexpf(1.0f, -bits * j);
            const float *xi = x + b + 8 * j;
            float *o = xp + b + 8 * j;
            for (int i = 0; i < 8; i++) o[i] = xi[i] * f;
        }
    }
    const int64_t ng = K / G;
    for (int64_t g = 0; g < ng; g++) {
        float t[8] = {0};
        for (int64_t k = g * G; k < (g + 1) * G; k += 8)
            for (int i = 0; i < 8; i++) t[i] += x[k + i];
        for (int i = 0; i < 8; i++) xs[g * 8 + i] = t[i];
    }
}

/* ---- portable ---------------------------------------------------------------------------- */
static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float dense1(const void *w, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

static inline uint32_t word_at(const uint32_t *w, int64_t nb, int64_t n, int64_t b, int64_t i) {
    return w[((n / 4) * nb + b) * 32 + (n % 4) * 8 + i];
}
static inline int64_t sidx(int64_t ng, int64_t n, int64_t g) { return ((n / 4) * ng + g) * 4 + n % 4; }

static void rows_q_portable(int bits, int64_t n0, int64_t n1, int64_t K, int64_t G, const float *xp,
                            const float *xs, const uint32_t *w, const float *s, const float *z, float off,
                            float *y) {
    const int per = 32 / bits;
    const int64_t blk = 8 * per, ng = K / G, nb = K / blk;
    const uint32_t mask = (1u << bits) - 1u;
    for (int64_t n = n0; n < n1; n++) {
        float lane_tot[8] = {0};
        for (int64_t g = 0; g < ng; g++) {
            float acc[8] = {0};
            for (int64_t k = g * G; k < (g + 1) * G; k++) {
                const int64_t b = k / blk, j = (k % blk) / 8, i = k % 8;
                const uint32_t word = word_at(w, nb, n, b, i);
                /* the same exact terms as the SIMD path: (code << bits*j) * (x * 2^-bits*j) */
                const float c = (j == per - 1) ? (float)(word >> (bits * j)) : (float)(word & (mask << (bits * j)));
                acc[i] += c * xp[k];
            }
            const float sc = s[sidx(ng, n, g)], ze = off + (z ? z[sidx(ng, n, g)] : 0.f);
            for (int i = 0; i < 8; i++) lane_tot[i] += (acc[i] - ze * xs[g * 8 + i]) * sc;
        }
        float t = 0.f;
        for (int i = 0; i < 8; i++) t += lane_tot[i];
        y[n] = t;
    }
}

/* ---- AVX2 + FMA -------------------------------------------------------------------------- */
#ifdef PQ_X86
/* One tile of 4 weight rows (they share the activation loads), 4-bit codes (1- to 3-bit codes are 4-bit
   codes with the high bits clear). Inputs run in half blocks of 32 (nibble positions 0-3 or 4-7), so a
   group of any multiple of 32 inputs is whole half blocks. STEP: position j's codes of the four rows,
   OP(v, M) (AND: masked in place by M; SRL: the top field shifted down by M), times x into A0..A3. */
#define AND _mm256_and_si256
#define SRL _mm256_srli_epi32
#define STEP(j, OP, M, A)                                                                           \
    {                                                                                               \
        const __m256 xv = _mm256_loadu_ps(xb + 8 * (j));                                            \
        A##0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(OP(v0, M)), xv, A##0);                            \
        A##1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(OP(v1, M)), xv, A##1);                            \
        A##2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(OP(v2, M)), xv, A##2);                            \
        A##3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(OP(v3, M)), xv, A##3);                            \
    }
/* tile t's weight words, scales and zero points (nb blocks, ng groups per row) and its four row totals */
#define TILE_BEGIN()                                                                                \
    const uint32_t *wt = w + t * nb * 32;                                                           \
    const float *st = s + t * ng * 4, *zt = z ? z + t * ng * 4 : NULL;                              \
    __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps(), t2 = _mm256_setzero_ps(), t3 = _mm256_setzero_ps();
#define TILE_END() { out[0] = pq_hsum8_ps(t0); out[1] = pq_hsum8_ps(t1); out[2] = pq_hsum8_ps(t2); out[3] = pq_hsum8_ps(t3); }
#define ZERO_ACC()                                                                                  \
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
/* 8-bit: two accumulators per row (even / odd positions), eight independent FMA chains (measured
   ~7 % faster there; the 4-bit loop runs out of registers with them and is slower) */
#define ZERO_ACC2()                                                                                 \
    ZERO_ACC()                                                                                      \
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
#define MERGE_ACC() { a0 = _mm256_add_ps(a0, c0); a1 = _mm256_add_ps(a1, c1); a2 = _mm256_add_ps(a2, c2); a3 = _mm256_add_ps(a3, c3); }
#define FINISH_GROUP()                                                                              \
    {                                                                                               \
        const __m256 xsg = _mm256_loadu_ps(xs + g * 8);                                             \
        const float *sg = st + g * 4, *zg = zt ? zt + g * 4 : NULL;                                 \
        t0 = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(off + (zg ? zg[0] : 0.f)), xsg, a0), _mm256_set1_ps(sg[0]), t0); \
        t1 = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(off + (zg ? zg[1] : 0.f)), xsg, a1), _mm256_set1_ps(sg[1]), t1); \
        t2 = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(off + (zg ? zg[2] : 0.f)), xsg, a2), _mm256_set1_ps(sg[2]), t2); \
        t3 = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(off + (zg ? zg[3] : 0.f)), xsg, a3), _mm256_set1_ps(sg[3]), t3); \
    }

__attribute__((target("avx2,fma"))) static void tile_q4_avx2(int64_t t, int64_t K, int64_t G, const float *xp,
                                                            const float *xs, const uint32_t *w, const float *s,
                                                            const float *z, float off, float *out) {
    const int64_t nb = K / 64, ng = K / G, hpg = G / 32;
    const __m256i k0 = _mm256_set1_epi32(0xF), k1 = _mm256_set1_epi32(0xF0), k2 = _mm256_set1_epi32(0xF00),
                  k3 = _mm256_set1_epi32(0xF000), k4 = _mm256_set1_epi32(0xF0000), k5 = _mm256_set1_epi32(0xF00000),
                  k6 = _mm256_set1_epi32(0xF000000);
    TILE_BEGIN()
    int64_t h = 0;
    for (int64_t g = 0; g < ng; g++) {
        ZERO_ACC()
        for (int64_t e = 0; e < hpg; e++, h++) {
            const int64_t b = h >> 1;
            const uint32_t *p = wt + b * 32;
            const float *xb = xp + b * 64;
            _mm_prefetch((const char *)(p + 384), _MM_HINT_T0);
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)p), v1 = _mm256_loadu_si256((const __m256i *)(p + 8)),
                          v2 = _mm256_loadu_si256((const __m256i *)(p + 16)), v3 = _mm256_loadu_si256((const __m256i *)(p + 24));
            if (!(h & 1)) {
                STEP(0, AND, k0, a) STEP(1, AND, k1, a) STEP(2, AND, k2, a) STEP(3, AND, k3, a)
            } else {
                STEP(4, AND, k4, a) STEP(5, AND, k5, a) STEP(6, AND, k6, a) STEP(7, SRL, 28, a)
            }
        }
        FINISH_GROUP()
    }
    TILE_END()
}

/* One tile of 4 rows, 8-bit codes: blocks of 32 inputs, byte positions 0-3. */
__attribute__((target("avx2,fma"))) static void tile_q8_avx2(int64_t t, int64_t K, int64_t G, const float *xp,
                                                            const float *xs, const uint32_t *w, const float *s,
                                                            const float *z, float off, float *out) {
    const int64_t nb = K / 32, ng = K / G, bpg = G / 32;
    const __m256i k0 = _mm256_set1_epi32(0xFF), k1 = _mm256_set1_epi32(0xFF00), k2 = _mm256_set1_epi32(0xFF0000);
    TILE_BEGIN()
    int64_t b = 0;
    for (int64_t g = 0; g < ng; g++) {
        ZERO_ACC2()
        for (int64_t e = 0; e < bpg; e++, b++) {
            const uint32_t *p = wt + b * 32;
            const float *xb = xp + b * 32;
            _mm_prefetch((const char *)(p + 256), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + 272), _MM_HINT_T0);
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)p), v1 = _mm256_loadu_si256((const __m256i *)(p + 8)),
                          v2 = _mm256_loadu_si256((const __m256i *)(p + 16)), v3 = _mm256_loadu_si256((const __m256i *)(p + 24));
            STEP(0, AND, k0, a) STEP(1, AND, k1, c) STEP(2, AND, k2, a) STEP(3, SRL, 24, c)
        }
        MERGE_ACC()
        FINISH_GROUP()
    }
    TILE_END()
}

__attribute__((target("avx2,fma"))) static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Dense weights, float32 or (bf16 != 0) bf16 bits: w[i] .. w[i + 8) as floats (dense1: w[i]). bf16 is a
   constant where these are inlined, so each caller compiles to its own loop without a branch. */
#define DENSE_FN __attribute__((target("avx2,fma"), always_inline)) static inline
DENSE_FN __m256 dense8(const void *w, int64_t i, int bf16) {
    return bf16 ? bf16x8((const uint16_t *)w + i) : _mm256_loadu_ps((const float *)w + i);
}

/* y[n] = w[n] . x for rows n0..n1: four rows per pass (they share the activation loads), then one at a time */
DENSE_FN void rows_dense_avx2(int64_t n0, int64_t n1, int64_t K, const float *x, const void *w, int bf16, float *y) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const int64_t r0 = n * K, r1 = r0 + K, r2 = r1 + K, r3 = r2 + K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            const __m256 xv = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(dense8(w, r0 + k, bf16), xv, a0);
            a1 = _mm256_fmadd_ps(dense8(w, r1 + k, bf16), xv, a1);
            a2 = _mm256_fmadd_ps(dense8(w, r2 + k, bf16), xv, a2);
            a3 = _mm256_fmadd_ps(dense8(w, r3 + k, bf16), xv, a3);
        }
        float t0 = pq_hsum8_ps(a0), t1 = pq_hsum8_ps(a1), t2 = pq_hsum8_ps(a2), t3 = pq_hsum8_ps(a3);
        for (; k < K; k++) {
            t0 += dense1(w, r0 + k, bf16) * x[k];
            t1 += dense1(w, r1 + k, bf16) * x[k];
            t2 += dense1(w, r2 + k, bf16) * x[k];
            t3 += dense1(w, r3 + k, bf16) * x[k];
        }
        y[n] = t0; y[n + 1] = t1; y[n + 2] = t2; y[n + 3] = t3;
    }
    for (; n < n1; n++) {
        const int64_t r = n * K;
        __m256 a = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(dense8(w, r + k, bf16), _mm256_loadu_ps(x + k), a);
        float t = pq_hsum8_ps(a);
        for (; k < K; k++) t += dense1(w, r + k, bf16) * x[k];
        y[n] = t;
    }
}

__attribute__((target("avx2,fma"))) static void rows_f32_avx2(int64_t n0, int64_t n1, int64_t K, const float *x,
                                                             const float *w, float *y) {
    rows_dense_avx2(n0, n1, K, x, w, 0, y);
}

__attribute__((target("avx2,fma"))) static void rows_bf16_avx2(int64_t n0, int64_t n1, int64_t K, const float *x,
                                                              const uint16_t *w, float *y) {
    rows_dense_avx2(n0, n1, K, x, w, 1, y);
}
#endif

/* dense float32 or (bf16) bf16 weights */
static void rows_dense_portable(int64_t n0, int64_t n1, int64_t K, const float *x, const void *w, int bf16, float *y) {
    for (int64_t n = n0; n < n1; n++) {
        float t = 0.f;
        for (int64_t k = 0; k < K; k++) t += dense1(w, n * K + k, bf16) * x[k];
        y[n] = t;
    }
}

/* round-to-nearest-even to bf16 (as torch casts), returned as a float */
static inline float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) { /* inf / nan: keep (quiet the nan) */
        if (u & 0x007fffffu) u |= 0x00400000u;
        u &= 0xffff0000u;
    } else {
        u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    }
    memcpy(&f, &u, 4);
    return f;
}

/* ---- the linear descriptor and one matrix-vector product -------------------------------- */
enum { PQ_F32 = 0, PQ_BF16 = 1, PQ_Q4 = 2, PQ_Q8 = 3 };

typedef struct {
    int64_t kind;     /* PQ_F32, PQ_BF16 (weight uint16 bf16 bits), PQ_Q4, PQ_Q8 (lanes layouts)        */
    int64_t n, k, g;  /* out features, in features, inputs per scale (integer kinds)                    */
    const void *w;
    const float *s;   /* [n][k/g] scales (integer kinds)                                                */
    const float *z;   /* [n][k/g] zero points or NULL                                                   */
    float off;        /* the code offset (integer kinds)                                                */
    int32_t bf16_io;  /* PQ_BF16: round the input to bf16 first and the output to bf16 after (torch.mv) */
    const float *bias;
} pq_linear;

/* y[n] = W x (+ bias) for one activation row; scratch: at least k + 8 * (k / g) floats (integer kinds) */
static void gemv_one(const pq_linear *L, const float *x, float *y, int64_t nthreads, int64_t simd, float *scratch) {
    const int64_t N = L->n, K = L->k;
    const int bits = L->kind == PQ_Q4 ? 4 : 8;
    const float *xin = x;
    if (L->kind == PQ_Q4 || L->kind == PQ_Q8) {
        prep_x(K, L->g, bits, x, scratch, scratch + K);
    } else if (L->kind == PQ_BF16 && L->bf16_io) {
        for (int64_t k = 0; k < K; k++) scratch[k] = round_bf16(x[k]);
        xin = scratch;
    }
    PQ_FOR_CHUNKS(n0, n1, N, ROWS_PER_TASK, nthreads) {
        if (L->kind == PQ_Q4 || L->kind == PQ_Q8) {
            const float *xp = scratch, *xs = scratch + K;
#ifdef PQ_X86
            if (simd == 2) { /* n0 is a multiple of 4: whole tiles, the last one possibly partial */
                for (int64_t n = n0; n < n1; n += 4) {
                    float o4[4];
                    if (bits == 4) tile_q4_avx2(n / 4, K, L->g, xp, xs, L->w, L->s, L->z, L->off, o4);
                    else tile_q8_avx2(n / 4, K, L->g, xp, xs, L->w, L->s, L->z, L->off, o4);
                    for (int64_t r = 0; r < 4 && n + r < n1; r++) y[n + r] = o4[r];
                }
                continue;
            }
#endif
            rows_q_portable(bits, n0, n1, K, L->g, xp, xs, L->w, L->s, L->z, L->off, y);
        } else {
            const int bf16 = L->kind == PQ_BF16;
#ifdef PQ_X86
            if (simd == 2 && bf16) { rows_bf16_avx2(n0, n1, K, xin, L->w, y); continue; }
            if (simd == 2) { rows_f32_avx2(n0, n1, K, xin, L->w, y); continue; }
#endif
            rows_dense_portable(n0, n1, K, xin, L->w, bf16, y);
        }
    }
    if (L->kind == PQ_BF16 && L->bf16_io) {
        /* torch.mv in bf16 rounds its result to bf16; a bias is then added in bf16 */
        for (int64_t n = 0; n < N; n++) y[n] = L->bias ? round_bf16(round_bf16(y[n]) + L->bias[n]) : round_bf16(y[n]);
    } else if (L->bias) {
        for (int64_t n = 0; n < N; n++) y[n] += L->bias[n];
    }
}

static int64_t scratch_floats(const pq_linear *L) {
    return L->k + 8 * (L->k / (L->g > 0 ? L->g : L->k)) + 8;
}

/* Y[M][N] (row stride ldy) = X[M][K] (row stride ldx) W^T (+ bias), row by row. */
void pq_gemv(const pq_linear *L, int64_t M, const float *x, int64_t ldx, float *y, int64_t ldy, int64_t nthreads,
             int64_t simd) {
    float *scratch = (float *)malloc(sizeof(float) * (size_t)scratch_floats(L));
    for (int64_t m = 0; m < M; m++) gemv_one(L, x + m * ldx, y + m * ldy, nthreads, simd, scratch);
    free(scratch);
}

/* out[N][K] = ((code - off) - z) * s, float32 (the reference's dequantization, bit for bit). */
void pq_q_dequant(int64_t bits, int64_t N, int64_t K, int64_t G, const uint32_t *w, const float *s, const float *z,
                  float off, float *out, int64_t nthreads) {
    const int per = (int)(32 / bits);
    const int64_t blk = 8 * per, ng = K / G, nb = K / blk;
    const uint32_t mask = (1u << bits) - 1u;
#pragma omp parallel for schedule(static) num_threads(PQ_THREADS(nthreads)) if (nthreads > 1)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < K; k++) {
            const int64_t b = k / blk, j = (k % blk) / 8, i = k % 8;
            const uint32_t code = (word_at(w, nb, n, b, i) >> (bits * j)) & mask;
            float v = (float)code - off;
            if (z) v -= z[sidx(ng, n, k / G)];
            out[n * K + k] = v * s[sidx(ng, n, k / G)];
        }
    }
}

/* ---- one decoder layer step (batch 1, one token) ----------------------------------------- */
typedef struct {
    const float *ln1, *ln2;   /* RMSNorm weights [H] */
    float eps1, eps2;
    pq_linear qkv, o, gu, down;
    float *kc, *vc;           /* this layer's caches [n_kv][max_len][hd] */
} pq_layer;

typedef struct {
    int64_t hidden, n_heads, n_kv, head_dim, max_len, inter;
    float scaling;
    const float *cos, *sin;   /* [max_len][hd] */
    float *buf;               /* scratch: see pq_decode_scratch */
} pq_model;

int64_t pq_decode_scratch(int64_t hidden, int64_t n_heads, int64_t n_kv, int64_t head_dim, int64_t max_len,
                          int64_t inter, int64_t kmax) {
    const int64_t qkv = (n_heads + 2 * n_kv) * head_dim;
    return hidden /* h */ + qkv + n_heads * head_dim /* attn out */ + hidden /* o out */ + 2 * inter + inter
           + max_len /* scores */ + kmax + 8 * kmax + 64;
}

static void rms_norm(int64_t H, const float *x, const float *w, float eps, float *out) {
    /* as torch's rms_norm: mean of squares in float32, x * rsqrt(mean + eps) * w */
    float ss = 0.f;
    for (int64_t i = 0; i < H; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)H + eps);
    for (int64_t i = 0; i < H; i++) out[i] = (x[i] * r) * w[i];
}

static void rope(int64_t hd, float *v, const float *cs, const float *sn) {
    const int64_t h = hd / 2;
    float tmp[1024];
    for (int64_t i = 0; i < hd; i++) tmp[i] = v[i];
    for (int64_t i = 0; i < h; i++) {
        v[i] = tmp[i] * cs[i] + (-tmp[i + h]) * sn[i];
        v[i + h] = tmp[i + h] * cs[i + h] + tmp[i] * sn[i + h];
    }
}

static float dot_portable(int64_t n, const float *a, const float *b) {
    float t = 0.f;
    for (int64_t i = 0; i < n; i++) t += a[i] * b[i];
    return t;
}

#ifdef PQ_X86
__attribute__((target("avx2,fma"))) static float dot_avx2(int64_t n, const float *a, const float *b) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float t = pq_hsum8_ps(acc);
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

__attribute__((target("avx2,fma"))) static void axpy_avx2(int64_t n, float a, const float *x, float *y) {
    const __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}
#endif

/* softmax(q k^T * scaling) v over the first len cached positions, per query head (grouped kv heads) */
static void attend(int64_t nh, int64_t nkv, int64_t hd, int64_t T, int64_t len, float scaling, const float *q,
                   const float *kc, const float *vc, float *sc, float *att, int64_t simd) {
    const int64_t grp = nh / nkv;
    for (int64_t a = 0; a < nh; a++) {
        const float *qa = q + a * hd, *kb = kc + (a / grp) * T * hd, *vb = vc + (a / grp) * T * hd;
        float mx = -INFINITY;
        for (int64_t p = 0; p < len; p++) {
#ifdef PQ_X86
            const float d = (simd == 2 ? dot_avx2(hd, qa, kb + p * hd) : dot_portable(hd, qa, kb + p * hd)) * scaling;
#else
            const float d = dot_portable(hd, qa, kb + p * hd) * scaling;
#endif
            sc[p] = d;
            if (d > mx) mx = d;
        }
        float sum = 0.f;
        for (int64_t p = 0; p < len; p++) {
            sc[p] = expf(sc[p] - mx);
            sum += sc[p];
        }
        const float inv = 1.0f / sum;
        float *oa = att + a * hd;
        for (int64_t i = 0; i < hd; i++) oa[i] = 0.f;
        for (int64_t p = 0; p < len; p++) {
#ifdef PQ_X86
            if (simd == 2) { axpy_avx2(hd, sc[p] * inv, vb + p * hd, oa); continue; }
#endif
            const float wgt = sc[p] * inv;
            for (int64_t i = 0; i < hd; i++) oa[i] += wgt * vb[p * hd + i];
        }
    }
}

/* x [hidden] (the residual stream, updated in place) through one layer at position pos. act: 0 silu. */
int64_t pq_decode_layer(const pq_model *M, const pq_layer *L, float *x, int64_t pos, int64_t nthreads,
                        int64_t simd) {
    const int64_t H = M->hidden, nh = M->n_heads, nkv = M->n_kv, hd = M->head_dim, T = M->max_len, I = M->inter;
    if (hd > 1024 || pos >= T) return -1;
    float *h = M->buf, *qkv = h + H, *att = qkv + (nh + 2 * nkv) * hd, *ob = att + nh * hd, *gu = ob + H,
          *act = gu + 2 * I, *sc = act + I, *scratch = sc + T;
    const float *cs = M->cos + pos * hd, *sn = M->sin + pos * hd;
    rms_norm(H, x, L->ln1, L->eps1, h);
    gemv_one(&L->qkv, h, qkv, nthreads, simd, scratch);
    float *q = qkv, *k = qkv + nh * hd, *v = k + nkv * hd;
    for (int64_t a = 0; a < nh; a++) rope(hd, q + a * hd, cs, sn);
    for (int64_t a = 0; a < nkv; a++) {
        rope(hd, k + a * hd, cs, sn);
        memcpy(L->kc + (a * T + pos) * hd, k + a * hd, sizeof(float) * hd);
        memcpy(L->vc + (a * T + pos) * hd, v + a * hd, sizeof(float) * hd);
    }
    attend(nh, nkv, hd, T, pos + 1, M->scaling, q, L->kc, L->vc, sc, att, simd);
    gemv_one(&L->o, att, ob, nthreads, simd, scratch);
    for (int64_t i = 0; i < H; i++) x[i] += ob[i];
    rms_norm(H, x, L->ln2, L->eps2, h);
    gemv_one(&L->gu, h, gu, nthreads, simd, scratch);
    for (int64_t i = 0; i < I; i++) {
        const float g = gu[i];
        act[i] = (g / (1.0f + expf(-g))) * gu[I + i];
    }
    gemv_one(&L->down, act, ob, nthreads, simd, scratch);
    for (int64_t i = 0; i < H; i++) x[i] += ob[i];
    return 0;
}

/* the final norm and the head: logits [vocab] from the residual x */
void pq_decode_head(const pq_model *M, const float *norm_w, float eps, const pq_linear *head, const float *x,
                    float *logits, int64_t nthreads, int64_t simd) {
    float *h = M->buf, *scratch = M->buf + M->hidden;
    rms_norm(M->hidden, x, norm_w, eps, h);
    gemv_one(head, h, logits, nthreads, simd, scratch);
}
