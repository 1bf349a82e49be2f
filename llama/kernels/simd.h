// Vector types shared by the products (cpu.cpp) and the decode step (decode.cpp): W floats a
// vector, chosen at build time (-march=native): AVX-512, AVX2+FMA, or one float (portable C++).

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace llk {

// --- fp16 scales: F16C where present, else the bit-exact conversion by hand ---

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        const float f = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24, exact
        return sign ? -f : f;
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

// Subnormal floats (below 1.2e-38) flushed to zero, as inputs and results, while in scope: on
// x86 each operation that meets one can take a hundred cycles, and softmax tails and SiLU of very
// negative inputs make them; a decode step of SmolLM2 on Zen 5 ran ~15% faster with them flushed.
// Their share of any sum is below fp32's resolution of the values that matter.
class FlushSubnormals {
  public:
#if defined(__SSE__)
    FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
    ~FlushSubnormals() { _mm_setcsr(saved_); }

  private:
    unsigned saved_;
#endif
};

// Asks for the cache lines of [p, p + bytes) ahead of their use.
inline void prefetch(const void* p, int64_t bytes) {
#if defined(__x86_64__) || defined(__i386__)
    const char* c = static_cast<const char*>(p);
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
#else
    (void)p, (void)bytes;
#endif
}

// --- vectors of W floats: the kernels below are written once against this interface ---

struct Scalar {
    static constexpr int W = 1;
    static constexpr int kRegisters = 16;  // vector registers a kernel may plan its tiles for
    using V = float;
    static V zero() { return 0.0f; }
    static V load(const float* p) { return *p; }
    static void store(float* p, V v) { *p = v; }
    static V set1(float v) { return v; }
    static V mul(V a, V b) { return a * b; }
    static V fma(V a, V b, V c) { return a * b + c; }
    static V add(V a, V b) { return a + b; }
    static V div(V a, V b) { return a / b; }
    static V max(V a, V b) { return a < b ? b : a; }
    static float sum(V v) { return v; }
    static float hmax(V v) { return v; }
};

#if defined(__AVX__)
// The sum of a 256-bit vector's 8 floats (also the integer kernels' accumulators on AVX-512 CPUs).
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if defined(__AVX512F__)
#define LLK_ISA "avx512"
struct Simd {
    static constexpr int W = 16;
    static constexpr int kRegisters = 32;
    using V = __m512;
    static V zero() { return _mm512_setzero_ps(); }
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static V set1(float v) { return _mm512_set1_ps(v); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V div(V a, V b) { return _mm512_div_ps(a, b); }
    static V max(V a, V b) { return _mm512_max_ps(a, b); }
    static float sum(V v) { return _mm512_reduce_add_ps(v); }
    static float hmax(V v) { return _mm512_reduce_max_ps(v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
#define LLK_ISA "avx2"
struct Simd {
    static constexpr int W = 8;
    static constexpr int kRegisters = 16;
    using V = __m256;
    static V zero() { return _mm256_setzero_ps(); }
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
    static V set1(float v) { return _mm256_set1_ps(v); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V div(V a, V b) { return _mm256_div_ps(a, b); }
    static V max(V a, V b) { return _mm256_max_ps(a, b); }
    static float hmax(V v) {
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    }
    static float sum(V v) { return hsum(v); }
};
#else
#define LLK_ISA "portable"
using Simd = Scalar;
#endif

// sum(a * b) over n floats: vectors of W, then the rest.
inline float dot(const float* a, const float* b, int64_t n) {
    Simd::V acc = Simd::zero();
    int64_t i = 0;
    for (; i + Simd::W <= n; i += Simd::W) acc = Simd::fma(Simd::load(a + i), Simd::load(b + i), acc);
    float s = Simd::sum(acc);
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

}  // namespace llk
