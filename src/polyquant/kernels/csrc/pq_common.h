/* What every compiled polyquant kernel (the .c files of kernels/csrc) starts with: the fixed-width types, the
 * x86 intrinsics where the target is x86-64 (PQ_X86), the thread count of an OpenMP region, and the
 * CPU feature probe behind each library's pq_<name>_simd_level().
 *
 * Code-path numbers (shared with polyquant.kernels.cext.runnable_levels): 0 portable C, 2 AVX2 + FMA,
 * 1 AVX-512F, 3 AVX-512 VNNI. cext.py copies this header next to the C file it builds and hashes it
 * into the cached library's key, so a change here rebuilds every library. */
#ifndef PQ_COMMON_H
#define PQ_COMMON_H

#include <stdint.h>
#include <stddef.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PQ_X86 1
#endif

/* the threads an OpenMP region runs with: nthreads, at least one */
#define PQ_THREADS(nthreads) ((int)((nthreads) > 0 ? (nthreads) : 1))

#define PQ_STR_(x) #x
#define PQ_PRAGMA(x) _Pragma(PQ_STR_(x))

/* The work sharing of the entry points: rows [0, N) in chunks of `chunk` rows (the last one shorter), one
 * chunk [n0, n1) per iteration of an OpenMP loop on nthreads threads (serial when nthreads <= 1). The
 * statement after the macro is the chunk's body; `continue` ends the chunk. */
#define PQ_FOR_CHUNKS(n0, n1, N, chunk, nthreads)                                                            \
    PQ_PRAGMA(omp parallel for schedule(static) num_threads(PQ_THREADS(nthreads)) if ((nthreads) > 1))       \
    for (int64_t pq_c_ = 0; pq_c_ < ((N) > 0 ? ((N) + (chunk) - 1) / (chunk) : 0); pq_c_++)                   \
        for (int64_t n0 = pq_c_ * (chunk), n1 = n0 + (chunk) < (N) ? n0 + (chunk) : (N); n0 < n1; n0 = n1)

/* Activation rows [0, M) in blocks of MB: m0 the block's first row, mb its rows (MB, the last block fewer). */
#define PQ_FOR_MBLOCKS(m0, mb, M, MB) \
    for (int64_t m0 = 0, mb = (M) < (MB) ? (M) : (MB); m0 < (M); m0 += (MB), mb = (M) - m0 < (MB) ? (M) - m0 : (MB))

/* The best float32 code path this CPU runs: 1 AVX-512F (only when allow_avx512), 2 AVX2 + FMA,
 * 0 portable C. */
static inline int pq_f32_simd_level(int allow_avx512) {
#ifdef PQ_X86
    __builtin_cpu_init();
    if (allow_avx512 && __builtin_cpu_supports("avx512f")) return 1;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
#endif
    (void)allow_avx512;
    return 0;
}

#ifdef PQ_X86
/* Prefetch the bytes at p of the next tile of four rows (rows 4..7 after p's, row stride `stride` bytes). */
static inline void pq_prefetch_next4(const uint8_t *p, int64_t stride) {
    _mm_prefetch((const char *)(p + 4 * stride), _MM_HINT_T0);
    _mm_prefetch((const char *)(p + 5 * stride), _MM_HINT_T0);
    _mm_prefetch((const char *)(p + 6 * stride), _MM_HINT_T0);
    _mm_prefetch((const char *)(p + 7 * stride), _MM_HINT_T0);
}

/* The sum of the 8 floats of a: ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)). */
__attribute__((target("avx"))) static inline float pq_hsum8_ps(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
#endif

#endif /* PQ_COMMON_H */
