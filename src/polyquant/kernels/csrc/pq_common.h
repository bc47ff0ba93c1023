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

#endif /* PQ_COMMON_H */
