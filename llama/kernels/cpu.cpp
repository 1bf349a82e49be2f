// Products of a few activation rows (decode steps, small batches) with a weight stored as
// nn.Linear does (n, k): fp32, int8 with float scales, or 4-bit groups with fp16 scale and min.
//
// Such products are bound by reading the weight, so each weight row is read from memory once for
// all activation rows. fp32 weights are multiplied in fp32; int8 and 4-bit weights meet activations
// quantized per block of 32 to int8 in integer dot products, as llama.cpp does (see below). Plain C
// ABI and no torch headers, so that it builds in seconds; the instruction set is chosen at build
// time (-march=native): AVX-512 or AVX2+FMA (integer products: AVX2, with VNNI where present), or
// portable C++ computing the same integers.

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <pthread.h>

#include "linear.h"
#include "simd.h"

namespace {

using namespace llk;

// A tile asks for the weight rows this many tiles ahead: the hardware prefetcher alone left
// products of short rows (k = 576) at a third of the memory's bandwidth on a 2-core EPYC (Zen 5).
constexpr int kPrefetchTiles = 2;
// int8 and 4-bit tiles ask for the weight bytes this far past each 8 blocks they read instead: a
// tile's rows are short and read side by side, and whole tiles asked for up front (kPrefetchTiles)
// left int8 products of 576-column rows at ~25 GB/s from memory; asking as they go, 4-8 KB ahead,
// ran them 1.2-1.3x faster (2 KB and 16 KB less so), on a 2-core EPYC (Zen 5), paired calls.
constexpr int64_t kAheadBytes = 6 << 10;

// --- fp32 weights: fp32 multiply-adds, W columns a vector ---

struct Product {
    const float* x;  // (m, k)
    const float* w;  // (n, k)
    float* y;        // (m, n), rows ldy apart
    int64_t m, k, n, ldy;
};

// acc[r][i] += weight row r's values at columns c + J.. times activation row i's, for J = 0, W,
// .. < End: the M activation vectors loaded once for the R weight rows, and each weight vector
// once for the M products. (Reloading activations per weight row, as memory operands of the
// multiply-adds, made the loads the bound: batch-4 products ran at a quarter of batch 1's weight
// bytes per second even from cache, on Zen 5.)
template <class S, int R, int M, int J, int End>
inline void step(const float* w, const float* x, int64_t k, int64_t c, typename S::V (&acc)[R][M]) {
    if constexpr (J < End) {
        typename S::V xv[M];
        for (int i = 0; i < M; ++i) xv[i] = S::load(x + i * k + c + J);
        for (int r = 0; r < R; ++r) {
            const typename S::V wv = S::load(w + r * k + c + J);
            for (int i = 0; i < M; ++i) acc[r][i] = S::fma(wv, xv[i], acc[r][i]);
        }
        step<S, R, M, J + S::W, End>(w, x, k, c, acc);
    }
}

// R weight rows from `row` times M activation rows from `i0`: R * M accumulators of W lanes.
template <class S, int R, int M>
void f32_tile(const Product& p, int64_t row, int64_t i0) {
    typename S::V acc[R][M];
    float tail[R][M];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < M; ++i) acc[r][i] = S::zero(), tail[r][i] = 0.0f;
    const float* x = p.x + i0 * p.k;
    const float* w = p.w + row * p.k;
    int64_t c = 0;
    if (M >= 3 && i0 == 0 && row + (kPrefetchTiles + 1) * R <= p.n) {
        // The rows kPrefetchTiles tiles ahead, two cache lines of each per 32 columns: memory keeps
        // streaming while the multiply-adds of 3-4 activation rows fill the core's window (a
        // decode step's products at batch 4 on Zen 5: 1.15-1.3x faster; at batch 1 no gain).
        const float* ahead = w + kPrefetchTiles * R * p.k;
        for (; c + 32 <= p.k; c += 32) {
            for (int r = 0; r < R; ++r) prefetch(ahead + r * p.k + c, 128);
            step<S, R, M, 0, 32>(w, x, p.k, c, acc);
        }
    }
    for (; c + 32 <= p.k; c += 32) step<S, R, M, 0, 32>(w, x, p.k, c, acc);
    for (; c + S::W <= p.k; c += S::W) step<S, R, M, 0, S::W>(w, x, p.k, c, acc);
    for (; c < p.k; ++c) step<Scalar, R, M, 0, 1>(w, x, p.k, c, tail);
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < M; ++i) p.y[(i0 + i) * p.ldy + row + r] = S::sum(acc[r][i]) + tail[r][i];
}

struct F32Kernel {
    static constexpr int kMaxRows = 6;
    // R * M accumulators, M activation vectors and a weight vector in the registers.
    static constexpr bool fits(int R, int M) { return R * M + M + 1 <= Simd::kRegisters; }
    // The most weight rows that fit, except for one activation row: 4 (4 and 8 stream alike).
    static int rows_per_tile(int64_t m) {
        const int M = static_cast<int>(std::min<int64_t>(m, 4));
        for (int R : {kMaxRows, 4, 3, 2})
            if (fits(R, M) && (M > 1 || R <= 4)) return R;
        return 1;
    }
    static int64_t row_bytes(int64_t k) { return 4 * k; }
    Product p;
    template <int R, int M> void tile(int64_t row, int64_t i0) const { f32_tile<Simd, R, M>(p, row, i0); }
};

// --- int8 and 4-bit weights: integer dot products per block of 32 columns, as llama.cpp's CPU
// backend does for Q8_0, Q4_0 and Q4_1. Each activation row is quantized per block to int8 with a
// float scale dx (symmetric, round to nearest even), keeping sx = dx * sum(qx) for the 4-bit min:
//   sum over a block of x * (d * q + m)  ~  (d * dx) * dot(q, qx) + m * sx.
// Converting the weight to floats costs more than reading it on AVX2; the integer products cost
// a few instructions per 32 weights. ---

constexpr int BLOCK = 32;

struct QuantizedX {
    std::vector<int8_t> q;  // (m, blocks * 32), zero past k
    std::vector<float> d;   // (m, stride): the blocks' scales dx, zero past the row's blocks
    std::vector<float> s;   // (m, stride): dx * sum(qx)
    // (m, stride * 8) and 16 more: per block, -128 times the sum of each 4 neighbouring qx (columns
    // 4l..4l+3 for l < 8), where a VNNI product's int32 lanes start when it takes q + 128 (Q8, below).
    std::vector<int32_t> offset;
    int64_t blocks, stride;
    const int8_t* row_q(int64_t i) const { return q.data() + i * blocks * BLOCK; }
    const float* row_d(int64_t i) const { return d.data() + i * stride; }
    const float* row_s(int64_t i) const { return s.data() + i * stride; }
    const int32_t* row_offset(int64_t i) const { return offset.data() + i * stride * 8; }
};

// n <= 32 values -> q, with the block's scale and scaled sum. The C++ and torch sides round alike:
// d = amax / 127, q = round_half_even(x * (127 / amax)), each an IEEE float operation.
inline void quantize_block(const float* x, int n, int8_t* q, float* d, float* s) {
#if defined(__AVX2__)
    if (n == BLOCK) {
        __m256 v[4], amax8 = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int t = 0; t < 4; ++t) {
            v[t] = _mm256_loadu_ps(x + 8 * t);
            amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, v[t]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        __m256i i32[4];
        for (int t = 0; t < 4; ++t) i32[t] = _mm256_cvtps_epi32(_mm256_mul_ps(v[t], id));  // MXCSR: nearest even
        const __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
        __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
        // packs work within 128-bit lanes: the permute puts the 8 runs of 4 back in column order.
        const __m256i i16a = _mm256_packs_epi32(i32[0], i32[1]), i16b = _mm256_packs_epi32(i32[2], i32[3]);
        const __m256i i8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i16a, i16b),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), i8);
        *d = amax / 127.0f;
        *s = *d * static_cast<float>(_mm_cvtsi128_si32(t4));
        return;
    }
#endif
    float amax = 0.0f;
    for (int j = 0; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int j = 0; j < BLOCK; ++j) {
        q[j] = j < n ? static_cast<int8_t>(std::nearbyint(x[j] * id)) : 0;
        sum += q[j];
    }
    *d = amax / 127.0f;
    *s = *d * static_cast<float>(sum);
}

void quantize_x(const float* x, int64_t m, int64_t k, QuantizedX& out) {
    out.blocks = (k + BLOCK - 1) / BLOCK;
    out.stride = (out.blocks + 7) / 8 * 8;  // whole vectors of 8 scales can be loaded
    out.q.resize(m * out.blocks * BLOCK);
    out.d.assign(m * out.stride, 0.0f);
    out.s.assign(m * out.stride, 0.0f);
    out.offset.assign(m * out.stride * 8 + 16, 0);  // a pair's 16 lanes may start at the last row's end
    for (int64_t i = 0; i < m; ++i)
        for (int64_t b = 0; b < out.blocks; ++b) {
            int8_t* q = out.q.data() + (i * out.blocks + b) * BLOCK;
            quantize_block(x + i * k + b * BLOCK, static_cast<int>(std::min<int64_t>(BLOCK, k - b * BLOCK)), q,
                           out.d.data() + i * out.stride + b, out.s.data() + i * out.stride + b);
            int32_t* offset = out.offset.data() + (i * out.stride + b) * 8;
#if defined(__AVX2__)
            const __m256i fours = _mm256_madd_epi16(  // 1 * q summed in pairs, then pairs of pairs
                _mm256_maddubs_epi16(_mm256_set1_epi8(1), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))),
                _mm256_set1_epi16(1));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(offset), _mm256_slli_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), fours), 7));
#else
            for (int l = 0; l < 8; ++l) offset[l] = -128 * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
#endif
        }
}

#if defined(__AVX2__) && defined(__FMA__)
#define LLK_INT_SIMD 1
inline __m128i load16(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// Two blocks per 512-bit dot product (CPUs with full-width AVX-512 units, e.g. Zen 5, Xeon):
// one 64-byte weight load and one activation load give 16 int32 sums, 8 per block.
#define LLK_VNNI512 1
#endif
// With VNNI, products in 128-bit halves of a block (16 columns): 16 unsigned bytes times 16 signed
// bytes -> 4 int32 sums of 4 neighbours, added to acc. Without, whole 256-bit blocks through
// maddubs (qpair).
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLK_VNNI 1
inline __m128i dot_u8s8(__m128i acc, __m128i u, __m128i s) { return _mm_dpbusd_epi32(acc, u, s); }
#elif defined(__AVXVNNI__)
#define LLK_VNNI 1
inline __m128i dot_u8s8(__m128i acc, __m128i u, __m128i s) { return _mm_dpbusd_avx_epi32(acc, u, s); }
#endif
struct Block128 { __m128i lo, hi; };  // a block's columns 0..15 and 16..31
#if defined(LLK_VNNI)
// The block's products with 32 signed bytes as 4 int32 sums, added to start.
inline __m128i block_sums(__m128i start, const Block128& w, const int8_t* x) {
    return dot_u8s8(dot_u8s8(start, w.lo, load16(x)), w.hi, load16(x + 16));
}
#endif
#endif

// Weight formats, each a row of blocks of 32: `value` (one column, for the portable path), the
// SIMD paths' blocks as unsigned bytes (`block` with 128-bit VNNI, `block2` with 512-bit VNNI,
// `block256` with AVX2 alone, which also has its own dot products `sums256`), `kOffset` (VNNI
// sums start from QuantizedX::offset: int8), `scale` of a block (multiplies dx), `min_term` (sum
// of m * sx over a row; 4-bit only) and `row_scale` (multiplies the row's output; per-row int8 only).

// out[j] = convert(scales[(b0 + j) / per_group]) for j < n, with one division.
template <class T, class Convert>
inline void group_scales(const T* scales, int64_t per_group, int64_t b0, int n, float* out, Convert convert) {
    int64_t g = b0 / per_group, left = per_group - b0 % per_group;
    for (int j = 0; j < n; ++j) {
        out[j] = convert(scales[g]);
        if (--left == 0) ++g, left = per_group;
    }
}

#if defined(LLK_VNNI512)
inline __mmask16 lanes16(int n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// group_scales for n <= 16 blocks as one vector, zeros after.
template <class T, class Convert>
inline __m512 group_values16(const T* scales, int64_t per_group, int64_t b0, int n, Convert convert) {
    alignas(64) float out[16] = {};
    group_scales(scales, per_group, b0, n, out, convert);
    return _mm512_load_ps(out);
}
#endif

// 4-bit values q in 0..15, value = d * q + m per group. Nibbles in GGUF Q4_0/Q4_1 order: for each
// 32 columns 16 bytes, byte j holding column j (low nibble) and column j + 16 (high nibble).
struct Q4 {
    static constexpr int kRows = 4;  // weight rows a tile takes for 1-2 activation rows
    static constexpr bool kOffset = false;
    static constexpr bool kMin = true;
    static constexpr int kBlockBytes = BLOCK / 2;
    const uint8_t* qs;
    const uint16_t* d;
    const uint16_t* m;
    int64_t k, groups;
    int64_t per_group = k / groups / BLOCK;  // blocks per group: computed once, divisions are slow
    const uint8_t* bytes(int64_t row, int64_t b) const { return qs + row * (k / 2) + b * (BLOCK / 2); }
    int value(int64_t row, int64_t c) const {
        const uint8_t byte = bytes(row, c / BLOCK)[c % 16];
        return c % BLOCK < 16 ? byte & 15 : byte >> 4;
    }
    float scale(int64_t row, int64_t b) const { return half_to_float(d[row * groups + b / per_group]); }
    float row_scale(int64_t) const { return 1.0f; }
    static int64_t row_bytes(int64_t k) { return k / 2 + k / BLOCK * 4; }  // with d and m per block
    bool scales8_in_array(int64_t row, int64_t b0, int64_t n) const { return per_group == 1 && row * groups + b0 + 8 <= n * groups; }
    void prefetch_scales(int64_t row, int64_t rows) const {
        prefetch(d + row * groups, rows * groups * 2);
        prefetch(m + row * groups, rows * groups * 2);
    }
    float min_term(int64_t row, const QuantizedX& x, int64_t i) const {
        const float* sx = x.row_s(i);
        const int64_t blocks = x.blocks;
        const uint16_t* mins = m + row * groups;
        int64_t b = 0;
        float sum = 0.0f;
#if defined(LLK_INT_SIMD) && defined(__F16C__)
        if (per_group == 1) {
            __m256 acc = _mm256_setzero_ps();
            for (; b + 8 <= blocks; b += 8) {
                const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + b)));
                acc = _mm256_fmadd_ps(mv, _mm256_loadu_ps(sx + b), acc);
            }
            sum = hsum(acc);
        }
#endif
        for (int64_t g = b / per_group, left = per_group - b % per_group; b < blocks; ++b) {
            sum += half_to_float(mins[g]) * sx[b];
            if (--left == 0) ++g, left = per_group;
        }
        return sum;
    }
#if defined(LLK_VNNI512)
    // Blocks b0..b0 + 15's scales d (mins m) as one vector, zero past the row's `nb` blocks.
    __m512 scales16(int64_t row, int64_t b0, int nb) const { return halves16(d, row, b0, nb); }
    __m512 mins16(int64_t row, int64_t b0, int nb) const { return halves16(m, row, b0, nb); }
    __m512 halves16(const uint16_t* a, int64_t row, int64_t b0, int nb) const {
        if (per_group == 1) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes16(nb), a + row * groups + b0));
        return group_values16(a + row * groups, per_group, b0, nb, half_to_float);
    }
#endif
    // The 8 blocks' scales from b0 (all in the row).
    void scales8(int64_t row, int64_t b0, float* out) const {
#if defined(__F16C__)
        if (per_group == 1) {
            _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + row * groups + b0))));
            return;
        }
#endif
        group_scales(d + row * groups, per_group, b0, 8, out, half_to_float);
    }
#if defined(LLK_INT_SIMD)
    Block128 block(int64_t row, int64_t b) const {
        const __m128i packed = load16(bytes(row, b)), mask = _mm_set1_epi8(15);
        return {_mm_and_si128(packed, mask), _mm_and_si128(_mm_srli_epi16(packed, 4), mask)};
    }
#if !defined(LLK_VNNI)
    // The whole block as 32 unsigned bytes in column order.
    __m256i block256(int64_t row, int64_t b) const {
        const Block128 w = block(row, b);
        return _mm256_inserti128_si256(_mm256_castsi128_si256(w.lo), w.hi, 1);
    }
    // The block's products as 8 int32 sums of 4 (at most 4 * 15 * 127 each).
    static __m256i sums256(__m256i w, const int8_t* x) {
        return _mm256_madd_epi16(_mm256_maddubs_epi16(w, load32(x)), _mm256_set1_epi16(1));
    }
#endif
#endif
#if defined(LLK_VNNI512)
    // Blocks b and b + 1 as 64 unsigned bytes in column order: the 32 packed bytes, each 16-byte
    // half repeated, the second copy's nibbles shifted down.
    __m512i block2(int64_t row, int64_t b) const {
        return expand2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes(row, b))));
    }
    static __m512i expand2(__m256i packed) {
        const __m512i both = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), _mm512_castsi256_si512(packed));
        const __m512i shift = _mm512_setr_epi64(0, 0, 0x0004000400040004, 0x0004000400040004, 0, 0, 0x0004000400040004, 0x0004000400040004);
        return _mm512_and_si512(_mm512_srlv_epi16(both, shift), _mm512_set1_epi8(15));
    }
    // Blocks b (and b + 1, if in the row): the same, zeros for a missing second block.
    __m512i last_blocks(int64_t row, int64_t b, int64_t) const {
        const __mmask32 mask = (b + 2) * BLOCK <= k ? ~__mmask32{0} : __mmask32{0xffff};
        return expand2(_mm256_maskz_loadu_epi8(mask, bytes(row, b)));
    }
#endif
};

// int8 values with a float scale per output row (groups == 1, any k) or per group of columns
// (GGUF Q8_0: 32). A per-row scale multiplies the row's output once.
struct Q8 {
#if defined(LLK_INT_SIMD) && !defined(LLK_VNNI)
    // Two: the sign trick's extra vectors left 4 rows' accumulators spilled to the stack on AVX2
    // (the haswell build's int8 products on Zen 5: 1.3-1.5x slower than 2 rows).
    static constexpr int kRows = 2;
#else
    static constexpr int kRows = 4;
#endif
#if defined(LLK_VNNI)
    static constexpr bool kOffset = true;  // see block()
#else
    static constexpr bool kOffset = false;
#endif
    static constexpr bool kMin = false;
    static constexpr int kBlockBytes = BLOCK;
    const int8_t* q;
    const float* s;
    int64_t k, groups;
    int64_t per_group = groups == 1 ? 0 : k / groups / BLOCK;  // 0: one scale for the row
    const uint8_t* bytes(int64_t row, int64_t b) const { return reinterpret_cast<const uint8_t*>(q + row * k + b * BLOCK); }
    int value(int64_t row, int64_t c) const { return q[row * k + c]; }
    float scale(int64_t row, int64_t b) const { return per_group ? s[row * groups + b / per_group] : 1.0f; }
    float row_scale(int64_t row) const { return per_group ? 1.0f : s[row]; }
    static int64_t row_bytes(int64_t k) { return k; }
    bool scales8_in_array(int64_t row, int64_t b0, int64_t n) const {
        return per_group == 0 || (per_group == 1 && row * groups + b0 + 8 <= n * groups);
    }
    void prefetch_scales(int64_t row, int64_t rows) const {
        prefetch(s + row * groups, rows * groups * 4);
    }
    float min_term(int64_t, const QuantizedX&, int64_t) const { return 0.0f; }
#if defined(LLK_VNNI512)
    __m512 scales16(int64_t row, int64_t b0, int nb) const {
        if (per_group == 1) return _mm512_maskz_loadu_ps(lanes16(nb), s + row * groups + b0);
        if (per_group == 0) return _mm512_maskz_mov_ps(lanes16(nb), _mm512_set1_ps(1.0f));
        return group_values16(s + row * groups, per_group, b0, nb, [](float v) { return v; });
    }
    __m512 mins16(int64_t, int64_t, int) const { return _mm512_setzero_ps(); }
#endif
    void scales8(int64_t row, int64_t b0, float* out) const {
#if defined(__AVX__)
        // One 256-bit store for qtile's one 256-bit load: after memcpy's copy that load stalled
        // (store forwarding, as in qtile) on the haswell build: per-block int8 steps 1.19x slower
        // than per-row ones, 1.04x with this.
        if (per_group == 1) return _mm256_storeu_ps(out, _mm256_loadu_ps(s + row * groups + b0));
#endif
        if (per_group == 1) std::memcpy(out, s + row * groups + b0, 8 * sizeof(float));
        else if (per_group) group_scales(s + row * groups, per_group, b0, 8, out, [](float v) { return v; });
        else std::fill(out, out + 8, 1.0f);
    }
#if defined(LLK_INT_SIMD)
    // The block's 32 values; per-row scales allow any k, so a row's last block may be short: its
    // values copied into `tail`, zero-padded.
    const int8_t* values(int64_t row, int64_t b, int8_t (&tail)[BLOCK]) const {
        const int8_t* p = q + row * k + b * BLOCK;
        if ((b + 1) * BLOCK <= k) return p;
        std::memset(tail, 0, BLOCK);
        std::memcpy(tail, p, k - b * BLOCK);
        return tail;
    }
#if defined(LLK_VNNI)
    // VNNI multiplies unsigned by signed bytes into int32 sums without int16 saturation, so the
    // products take q + 128 (one xor) in place of the sign trick's three instructions per vector,
    // each int32 lane starting from -128 times the sum of its qx (QuantizedX::offset): the same
    // integers, lane for lane (int8 products of SmolLM2's shapes on Zen 5: 4-12% faster in cache,
    // ~7% from memory).
    Block128 block(int64_t row, int64_t b) const {
        int8_t tail[BLOCK];
        const int8_t* v = values(row, b, tail);
        const __m128i flip = _mm_set1_epi8(-128);
        return {_mm_xor_si128(load16(v), flip), _mm_xor_si128(load16(v + 16), flip)};
    }
#else
    __m256i block256(int64_t row, int64_t b) const {
        int8_t tail[BLOCK];
        return load32(values(row, b, tail));
    }
    // The sign trick on 32 columns: 16 int16 pair sums (at most 2 * 128 * 127), widened to 8 int32.
    static __m256i sums256(__m256i w, const int8_t* x) {
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(load32(x), w));
        return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
    }
#endif
#endif
#if defined(LLK_VNNI512)
    // Blocks b and b + 1 (whole, inside the row): 64 values q + 128 as unsigned bytes.
    __m512i block2(int64_t row, int64_t b) const {
        return _mm512_xor_si512(_mm512_loadu_si512(q + row * k + b * BLOCK), _mm512_set1_epi8(-128));
    }
    // The row's last blocks from b: its columns up to k (at most 64), 128 after (meeting qx = 0).
    __m512i last_blocks(int64_t row, int64_t b, int64_t columns) const {
        const int64_t n = std::min<int64_t>(64, columns - b * BLOCK);
        const __m512i w = _mm512_maskz_loadu_epi8(n == 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1, q + row * k + b * BLOCK);
        return _mm512_xor_si512(w, _mm512_set1_epi8(-128));
    }
#endif
};

struct QProduct {
    const QuantizedX* x;
    float* y;  // (m, n), rows ldy apart
    int64_t m, k, n, ldy;
};

#if defined(LLK_INT_SIMD)
// acc[r][i] += blocks b and b + 4 (zero if !pair) of weight row row + r times activation row
// i0 + i. Pairing b with b + 4 makes their scales (d * dx) one in-lane shuffle of 8 blocks' scales:
// [s0..s3 | s4..s7] -> [s_j x4 | s_j+4 x4].
template <class Fmt, int R, int M, int J>
inline void qpair(const Fmt& f, const QuantizedX& x, int64_t row, int64_t i0, int64_t b, bool pair,
                  const float (&scales)[R][M][8], __m256 (&acc)[R][M]) {
#if defined(LLK_VNNI)
    // 128-bit dot products (AVX-VNNI): each block's 4 int32 sums fill one half of the vector.
    for (int r = 0; r < R; ++r) {
        const Block128 w0 = f.block(row + r, b);
        const Block128 w1 = pair ? f.block(row + r, b + 4) : Block128{};
        for (int i = 0; i < M; ++i) {
            const int8_t* qx = x.row_q(i0 + i) + b * BLOCK;
            // Lane l sums columns 4l..4l+3 and 16+4l..16+4l+3: its offset is lanes l and l + 4's.
            const int32_t* offset = x.row_offset(i0 + i) + b * 8;
            const __m128i zero = _mm_setzero_si128();
            const __m128i start0 = Fmt::kOffset ? _mm_add_epi32(load16(offset), load16(offset + 4)) : zero;
            const __m128i start1 = Fmt::kOffset && pair ? _mm_add_epi32(load16(offset + 32), load16(offset + 36)) : zero;
            const __m128i s0 = block_sums(start0, w0, qx);
            const __m128i s1 = pair ? block_sums(start1, w1, qx + 4 * BLOCK) : zero;
            const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(s0), s1, 1);
            const __m256 scale = _mm256_permute_ps(_mm256_load_ps(scales[r][i]), J * 0x55);
            acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(both), scale, acc[r][i]);
        }
    }
#else
    // Whole 256-bit blocks (half the instructions of 128-bit halves where the CPU has 256-bit units;
    // Zen 1 splits them, and should pay about the same per byte: not measured there): each block's
    // 8 int32 sums, pairwise added across the two blocks into [b b b+4 b+4 | b b b+4 b+4], meet
    // the scales in that order.
    const __m256i order = _mm256_setr_epi32(J, J, J + 4, J + 4, J, J, J + 4, J + 4);
    for (int r = 0; r < R; ++r) {
        const __m256i w0 = f.block256(row + r, b);
        const __m256i w1 = pair ? f.block256(row + r, b + 4) : _mm256_setzero_si256();
        for (int i = 0; i < M; ++i) {
            const int8_t* qx = x.row_q(i0 + i) + b * BLOCK;
            const __m256i s0 = Fmt::sums256(w0, qx);
            const __m256i s1 = pair ? Fmt::sums256(w1, qx + 4 * BLOCK) : _mm256_setzero_si256();
            const __m256 scale = _mm256_permutevar8x32_ps(_mm256_load_ps(scales[r][i]), order);
            acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(s0, s1)), scale, acc[r][i]);
        }
    }
#endif
}
#endif

#if defined(LLK_VNNI512)
// acc[r][i] += blocks b0 + j and b0 + j + 1 of weight row row + r times activation row i0 + i, in
// one 512-bit dot product, each block's 8 sums times its d * dx (lane j of scales[r][i]); J >= 0
// fixes j at compile time. Not Whole: the row's last `left` blocks (1 or 2, the last possibly short
// of `columns`), loaded masked.
template <class Fmt, int R, int M, int J, bool Whole>
[[gnu::always_inline]] inline void vnni512_pair(const Fmt& f, const QuantizedX& x, int64_t row, int64_t i0, int64_t b0,
                         const __m512 (&scales)[R][M], __m512 (&acc)[R][M], int j = J, int left = 2, int64_t columns = 0) {
    const __m512i lanes = _mm512_setr_epi32(j, j, j, j, j, j, j, j, j + 1, j + 1, j + 1, j + 1, j + 1, j + 1, j + 1, j + 1);
    const __mmask64 x_mask = left >= 2 ? ~__mmask64{0} : (__mmask64{1} << BLOCK) - 1;
    __m512i xs[M], starts[M];  // each activation row's blocks, and where its sums start: loaded once for R rows
    for (int i = 0; i < M; ++i) {
        const int8_t* qx = x.row_q(i0 + i) + (b0 + j) * BLOCK;
        xs[i] = Whole ? _mm512_loadu_si512(qx) : _mm512_maskz_loadu_epi8(x_mask, qx);
        starts[i] = Fmt::kOffset ? _mm512_loadu_si512(x.row_offset(i0 + i) + (b0 + j) * 8) : _mm512_setzero_si512();
    }
    for (int r = 0; r < R; ++r) {
        const __m512i w = Whole ? f.block2(row + r, b0 + j) : f.last_blocks(row + r, b0 + j, columns);
        for (int i = 0; i < M; ++i) {
            const __m512i sums = _mm512_dpbusd_epi32(starts[i], w, xs[i]);
            const __m512 scale = _mm512_permutexvar_ps(lanes, scales[r][i]);
            acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[r][i]);
        }
    }
}
#endif

#if defined(LLK_VNNI512)
// qtile (below) with 512-bit VNNI, 16 blocks at a time: their weight scales d (and 4-bit mins m)
// come as one vector a row, meet the activations' dx (and sx) in one multiply, and each pair of
// blocks takes its two lanes by a permute in registers. (Scales of 8 blocks at a time, stored and
// reloaded per pair, and the mins summed in a second pass, had made 4-bit products of 576-column
// rows run at ~60% of int8's bytes per second on Zen 5.)
template <class Fmt, int R, int M>
void qtile512(const Fmt& f, const QProduct& p, int64_t row, int64_t i0) {
    const QuantizedX& x = *p.x;
    if (i0 == 0 && row + (kPrefetchTiles + 1) * R <= p.n) f.prefetch_scales(row + kPrefetchTiles * R, R);
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < x.blocks; b0 += 16) {
        const int nb = static_cast<int>(std::min<int64_t>(16, x.blocks - b0));
        __m512 dx[M], sx[M], scales[R][M];
        for (int i = 0; i < M; ++i) {
            dx[i] = _mm512_maskz_loadu_ps(lanes16(nb), x.row_d(i0 + i) + b0);
            if constexpr (Fmt::kMin) sx[i] = _mm512_maskz_loadu_ps(lanes16(nb), x.row_s(i0 + i) + b0);
        }
        for (int r = 0; r < R; ++r) {
            if (i0 == 0) prefetch(f.bytes(row + r, b0) + kAheadBytes, 16 * Fmt::kBlockBytes);
            const __m512 d = f.scales16(row + r, b0, nb);
            for (int i = 0; i < M; ++i) scales[r][i] = _mm512_mul_ps(d, dx[i]);
            if constexpr (Fmt::kMin) {  // the blocks' m * sx join the sums: every lane is added up at the end
                const __m512 mins = f.mins16(row + r, b0, nb);
                for (int i = 0; i < M; ++i) acc[r][i] = _mm512_fmadd_ps(mins, sx[i], acc[r][i]);
            }
        }
        // Whole pairs of blocks, then the row's last one or two (the second possibly short) by
        // masked loads: zeros past the row's columns, and past the activations' blocks.
        if (nb == 16 && (b0 + 16) * BLOCK <= p.k) {
            vnni512_pair<Fmt, R, M, 0, true>(f, x, row, i0, b0, scales, acc);
            vnni512_pair<Fmt, R, M, 2, true>(f, x, row, i0, b0, scales, acc);
            vnni512_pair<Fmt, R, M, 4, true>(f, x, row, i0, b0, scales, acc);
            vnni512_pair<Fmt, R, M, 6, true>(f, x, row, i0, b0, scales, acc);
            vnni512_pair<Fmt, R, M, 8, true>(f, x, row, i0, b0, scales, acc);
            vnni512_pair<Fmt, R, M, 10, true>(f, x, row, i0, b0, scales, acc);
            vnni512_pair<Fmt, R, M, 12, true>(f, x, row, i0, b0, scales, acc);
            vnni512_pair<Fmt, R, M, 14, true>(f, x, row, i0, b0, scales, acc);
        } else {
            int j = 0;
            for (; j + 2 <= nb && (b0 + j + 2) * BLOCK <= p.k; j += 2) vnni512_pair<Fmt, R, M, -1, true>(f, x, row, i0, b0, scales, acc, j);
            if (j < nb) vnni512_pair<Fmt, R, M, -1, false>(f, x, row, i0, b0, scales, acc, j, nb - j, p.k);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < M; ++i) p.y[(i0 + i) * p.ldy + row + r] = _mm512_reduce_add_ps(acc[r][i]) * f.row_scale(row + r);
}
#endif

// R weight rows from `row` times M activation rows from `i0`. Per block each product's 8 int32
// partial sums become floats and meet the scale d * dx in a fused multiply-add: the accumulators
// stay vectors, summed across lanes once at the end.
template <class Fmt, int R, int M>
void qtile(const Fmt& f, const QProduct& p, int64_t row, int64_t i0) {
    const QuantizedX& x = *p.x;
    if (i0 == 0 && row + (kPrefetchTiles + 1) * R <= p.n) f.prefetch_scales(row + kPrefetchTiles * R, R);
    float out[R][M];
#if defined(LLK_INT_SIMD)
    __m256 acc[R][M];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < M; ++i) acc[r][i] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < x.blocks; b0 += 8) {
        const int nb = static_cast<int>(std::min<int64_t>(8, x.blocks - b0));
        alignas(32) float scales[R][M][8];  // d * dx of blocks b0..b0 + 7
        for (int r = 0; r < R; ++r) {
            if (i0 == 0) prefetch(f.bytes(row + r, b0) + kAheadBytes, 8 * Fmt::kBlockBytes);
            alignas(32) float d[8] = {};
            // Past the row's last block scales8 reads the next row's scales, which meet dx = 0: whole
            // vectors, where single floats stored and loaded back as one stall the load (store
            // forwarding) and cost a third of a k = 576 product's time on Zen 5.
            if (nb == 8 || f.scales8_in_array(row + r, b0, p.n)) f.scales8(row + r, b0, d);
            else
                for (int j = 0; j < nb; ++j) d[j] = f.scale(row + r, b0 + j);
            for (int i = 0; i < M; ++i)
                _mm256_store_ps(scales[r][i], _mm256_mul_ps(_mm256_load_ps(d), _mm256_loadu_ps(x.row_d(i0 + i) + b0)));
        }
        if (nb == 8) {
            qpair<Fmt, R, M, 0>(f, x, row, i0, b0 + 0, true, scales, acc);
            qpair<Fmt, R, M, 1>(f, x, row, i0, b0 + 1, true, scales, acc);
            qpair<Fmt, R, M, 2>(f, x, row, i0, b0 + 2, true, scales, acc);
            qpair<Fmt, R, M, 3>(f, x, row, i0, b0 + 3, true, scales, acc);
        } else {  // the row's last blocks: j < 4 meets j + 4 where that is in the row
            if (nb > 0) qpair<Fmt, R, M, 0>(f, x, row, i0, b0 + 0, nb > 4, scales, acc);
            if (nb > 1) qpair<Fmt, R, M, 1>(f, x, row, i0, b0 + 1, nb > 5, scales, acc);
            if (nb > 2) qpair<Fmt, R, M, 2>(f, x, row, i0, b0 + 2, nb > 6, scales, acc);
            if (nb > 3) qpair<Fmt, R, M, 3>(f, x, row, i0, b0 + 3, false, scales, acc);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < M; ++i) out[r][i] = hsum(acc[r][i]);
#else
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < M; ++i) {
            const int8_t* qx = x.row_q(i0 + i);
            float sum = 0.0f;
            for (int64_t b = 0; b < x.blocks; ++b) {
                int dot = 0;
                for (int64_t c = b * BLOCK; c < std::min<int64_t>(p.k, (b + 1) * BLOCK); ++c)
                    dot += f.value(row + r, c) * qx[c];
                sum += f.scale(row + r, b) * x.row_d(i0 + i)[b] * static_cast<float>(dot);
            }
            out[r][i] = sum;
        }
#endif
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < M; ++i)
            p.y[(i0 + i) * p.ldy + row + r] =
                (out[r][i] + f.min_term(row + r, x, i0 + i)) * f.row_scale(row + r);
}

template <class Fmt>
struct QKernel {
    // Weight rows per tile for m activation rows: a pair of blocks holds 4 vectors of weights, so
    // at most 8 accumulators.
    static constexpr int kMaxRows = 4;
    static constexpr bool fits(int R, int M) { return R * M <= 12; }
    static int rows_per_tile(int64_t m) { return m <= 2 ? Fmt::kRows : 2; }
    static int64_t row_bytes(int64_t k) { return Fmt::row_bytes(k); }
    Fmt f;
    QProduct p;
    template <int R, int M> void tile(int64_t row, int64_t i0) const {
#if defined(LLK_VNNI512)
        qtile512<Fmt, R, M>(f, p, row, i0);
#else
        qtile<Fmt, R, M>(f, p, row, i0);
#endif
    }
};

// R weight rows against all m activation rows, 4 at a time. K::rows_per_tile(m) chose R so that
// R weight rows fit beside min(m, 4) activation rows (K::fits), and so beside fewer.
template <class K, int R>
void tiles(const K& kernel, int64_t m, int64_t row) {
    int64_t i0 = 0;
    if constexpr (K::fits(R, 4))
        for (; i0 + 4 <= m; i0 += 4) kernel.template tile<R, 4>(row, i0);
    if constexpr (K::fits(R, 3))
        for (; i0 + 3 <= m; i0 += 3) kernel.template tile<R, 3>(row, i0);
    if constexpr (K::fits(R, 2))
        if (m - i0 == 2) kernel.template tile<R, 2>(row, i0);
    if (m - i0 == 1) kernel.template tile<R, 1>(row, i0);
}

// Weight rows [row, r1) in tiles of R, as many as fit; returns the first row left.
template <class K, int R>
int64_t tiled_rows(const K& kernel, int64_t m, int64_t row, int64_t r1) {
    for (; row + R <= r1; row += R) tiles<K, R>(kernel, m, row);
    return row;
}

// Weight rows [r0, r1) against all m activation rows: a block of a few weight rows stays in cache
// while it meets each group of activation rows.
template <class K>
void rows(const K& kernel, int64_t m, int64_t r0, int64_t r1) {
    int64_t row = r0;
    switch (K::rows_per_tile(m)) {
        case 6: if constexpr (K::kMaxRows >= 6) row = tiled_rows<K, 6>(kernel, m, row, r1); break;
        case 4: row = tiled_rows<K, 4>(kernel, m, row, r1); break;
        case 3: row = tiled_rows<K, 3>(kernel, m, row, r1); break;
        case 2: row = tiled_rows<K, 2>(kernel, m, row, r1); break;
    }
    for (; row < r1; ++row) tiles<K, 1>(kernel, m, row);
}

// --- threads: a small persistent pool. Work is split into chunks of weight rows claimed from an
// atomic counter; the caller claims chunks too, so a worker that the OS has descheduled delays the
// product by at most the chunk it holds, and one that has not woken up yet delays nothing. ---

using ChunkFn = void (*)(const void* ctx, int64_t chunk);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
}

class Pool {
  public:
    void set_threads(int n) {
        std::lock_guard<std::mutex> lk(run_mu_);
        threads_.store(n < 1 ? 1 : n);
        stop_workers();
    }
    int threads() const { return threads_.load(); }

    // fn(ctx, c) for c in [0, chunks); returns when all are done. A product started while another
    // runs (from a second Python thread) runs on its caller's thread alone.
    void run(ChunkFn fn, const void* ctx, int64_t chunks) {
        std::unique_lock<std::mutex> lk(run_mu_, std::try_to_lock);
        if (!lk.owns_lock() || threads_ == 1 || chunks == 1) {
            for (int64_t c = 0; c < chunks; ++c) fn(ctx, c);
            return;
        }
        if (workers_.size() != static_cast<size_t>(threads_.load() - 1)) start_workers();
        fn_ = fn;
        ctx_ = ctx;
        done_.store(0, std::memory_order_relaxed);
        const uint64_t gen = (generation(ticket_.load()) + 1) & kGenMask;
        ticket_.store(gen << 40 | static_cast<uint64_t>(chunks) << 20);  // seq_cst: before sleepers_
        if (sleepers_.load() > 0) {
            std::lock_guard<std::mutex> g(sleep_mu_);
            wake_.notify_all();
        }
        work();
        for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
            if (spins < kCallerSpins) cpu_relax();
            else std::this_thread::yield();  // a worker holding a chunk may need this core
        }
    }

    // After fork() the child has no workers: forget them (never join) and start anew on next use.
    void forget_workers_after_fork() {
        new (&run_mu_) std::mutex();
        new (&sleep_mu_) std::mutex();
        new (&wake_) std::condition_variable();
        sleepers_.store(0);
        new (&workers_) std::vector<std::thread>();  // leaks the parent's thread handles
    }

  private:
    static constexpr uint64_t kGenMask = (1u << 24) - 1, kChunkMask = (1u << 20) - 1;
    static constexpr int kCallerSpins = 20000;
    // A decode step calls products back to back, a few microseconds of Python apart: workers spin
    // this long for the next one before they sleep.
    static constexpr auto kWorkerSpin = std::chrono::microseconds(200);

    static uint64_t generation(uint64_t ticket) { return ticket >> 40; }

    void work() {
        uint64_t t = ticket_.load(std::memory_order_acquire);
        for (;;) {
            const uint64_t chunks = (t >> 20) & kChunkMask, next = t & kChunkMask;
            if (next >= chunks) return;
            if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
                fn_(ctx_, static_cast<int64_t>(next));  // fn_ of this ticket: its product is not done
                done_.fetch_add(1, std::memory_order_release);
                t = ticket_.load(std::memory_order_acquire);
            }
        }
    }

    void worker() {
        const FlushSubnormals flush;  // for the thread's life: it only runs products and decode steps
        uint64_t seen = generation(ticket_.load());
        for (;;) {
            auto until = std::chrono::steady_clock::now() + kWorkerSpin;
            for (int spins = 0; generation(ticket_.load(std::memory_order_acquire)) == seen && !stop_.load(); ++spins) {
                cpu_relax();
                if (spins % 64 == 0 && std::chrono::steady_clock::now() > until) {
                    std::unique_lock<std::mutex> lk(sleep_mu_);
                    sleepers_.fetch_add(1);  // seq_cst: the caller checks it after its ticket store
                    wake_.wait(lk, [&] { return generation(ticket_.load()) != seen || stop_.load(); });
                    sleepers_.fetch_sub(1);
                }
            }
            if (stop_.load()) return;
            seen = generation(ticket_.load(std::memory_order_acquire));
            work();
        }
    }

    void start_workers() {
        stop_workers();
        stop_.store(false);
        for (int i = 1; i < threads_.load(); ++i) workers_.emplace_back([this] { worker(); });
    }

    void stop_workers() {
        {
            std::lock_guard<std::mutex> g(sleep_mu_);
            stop_.store(true);
            wake_.notify_all();
        }
        for (auto& t : workers_) t.join();
        workers_.clear();
    }

    std::atomic<uint64_t> ticket_{0};  // generation (24 bits) | chunks (20) | next chunk (20)
    std::atomic<int64_t> done_{0};
    ChunkFn fn_ = nullptr;
    const void* ctx_ = nullptr;
    std::atomic<int> threads_{1};  // read by products outside run_mu_
    std::mutex run_mu_, sleep_mu_;
    std::condition_variable wake_;
    std::atomic<int> sleepers_{0};
    std::atomic<bool> stop_{false};
    std::vector<std::thread> workers_;
};

Pool& pool() {
    static Pool* p = [] {
        pthread_atfork(nullptr, nullptr, [] { pool().forget_workers_after_fork(); });
        return new Pool();  // never destroyed: workers may still spin while the process exits
    }();
    return *p;
}

// Below this many weights a product runs on the caller's thread alone: waking a worker costs about
// what it saves. Measured on a 2-core EPYC (Zen, AVX2) shared with other processes, timing 1 and 2
// threads call by call in turn: fp32 576x576 ties (0.033 vs 0.034 ms at m=1), 2 threads win by
// 5-20% from 576x1536 up, with or without a busy process beside.
constexpr int64_t kMinParallelWeights = 1 << 18;
// Chunks of about this many bytes of weight (a quarter of a thread's share at most): each thread
// streams long runs, and the threads claim chunks rarely. On a 2-core EPYC (Zen 5), 2 MB chunks ran
// 1- to 4-row products of 2048-column weights 1.1-1.4x faster than 128 KB ones (paired calls), and
// chunks of 10 KB had run 1.4x slower than 128 KB. A descheduled worker holds up at most one chunk:
// ~50 us of streaming at 2 MB, well below the scheduler's time slice that it waits for anyway.
constexpr int64_t kChunkBytes = 2 << 20;

// Products of one input with up to kMaxParts weights (a layer's q, k and v; w1 and w3), their
// chunks handed out from one counter: one pool run, and no thread idles between the products.
constexpr int kMaxParts = 3;

template <class K>
struct Job {
    const K* kernels;
    int parts;
    int64_t m, n[kMaxParts], chunk_rows[kMaxParts], first_chunk[kMaxParts + 1];
    static void run_chunk(const void* ctx, int64_t c) {
        const Job& j = *static_cast<const Job*>(ctx);
        int p = 0;
        while (c >= j.first_chunk[p + 1]) ++p;
        const int64_t r0 = (c - j.first_chunk[p]) * j.chunk_rows[p], r1 = std::min(j.n[p], r0 + j.chunk_rows[p]);
        rows(j.kernels[p], j.m, r0, r1);
    }
};

// Each kernels[p].p.y (m, n_p) by the kernels' tiles, weight rows split between the pool's threads.
template <class K>
void products(const K* kernels, int parts, int64_t m, int64_t k) {
    const int threads = pool().threads();
    int64_t weights = 0;
    for (int p = 0; p < parts; ++p) weights += kernels[p].p.n * k;
    if (threads == 1 || weights < kMinParallelWeights) {
        for (int p = 0; p < parts; ++p) rows(kernels[p], m, 0, kernels[p].p.n);
        return;
    }
    Job<K> job{kernels, parts, m, {}, {}, {}};
    for (int p = 0; p < parts; ++p) {
        // Multiples of 12 rows (tiles of 2, 3, 4 or 6); at least 4 chunks per thread where n allows.
        const int64_t n = kernels[p].p.n;
        int64_t chunk_rows = std::max<int64_t>(1, kChunkBytes / K::row_bytes(k));
        chunk_rows = std::min<int64_t>(chunk_rows, n / (4 * threads));
        chunk_rows = std::max<int64_t>(12, (chunk_rows + 11) / 12 * 12);
        job.n[p] = n, job.chunk_rows[p] = chunk_rows;
        job.first_chunk[p + 1] = job.first_chunk[p] + (n + chunk_rows - 1) / chunk_rows;
    }
    pool().run(&Job<K>::run_chunk, &job, job.first_chunk[parts]);
}

// make(p) for p < parts (the last repeated in unused slots: the types have no empty state).
template <class T, class Make>
std::array<T, kMaxParts> each_part(int parts, Make make) {
    return {make(0), make(std::min(1, parts - 1)), make(std::min(2, parts - 1))};
}

// x (m, k) times each weight: y (m, n_0 + n_1 + ..), each row the parts' outputs side by side.
template <class Fmt>
void quantized_products(const std::array<Fmt, kMaxParts>& formats, const int64_t* ns, int parts, const float* x, float* y,
                        int64_t m, int64_t k) {
    thread_local QuantizedX qx;  // reused: a decode step's products are the same few sizes
    quantize_x(x, m, k, qx);
    int64_t ldy = 0, column[kMaxParts] = {};
    for (int p = 0; p < parts; ++p) column[p] = ldy, ldy += ns[p];
    const auto kernels = each_part<QKernel<Fmt>>(parts, [&](int p) {
        return QKernel<Fmt>{formats[p], QProduct{&qx, y + column[p], m, k, ns[p], ldy}};
    });
    products(kernels.data(), parts, m, k);
}

}  // namespace

extern "C" {

const char* llk_isa() { return LLK_ISA; }

void llk_set_threads(int n) { pool().set_threads(n); }

int llk_threads() { return pool().threads(); }

// fn(ctx, i) for i in [0, n) on the pool's threads (the decode step's attention heads).
void llk_parallel_for(void (*fn)(const void* ctx, int64_t i), const void* ctx, int64_t n) {
    if (n > 0) pool().run(fn, ctx, n);
}

// y (m, n) = x (m, k) @ w (n, k)^T
void llk_linear_f32(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n) {
    const FlushSubnormals flush;
    const F32Kernel kernel{Product{x, w, y, m, k, n, n}};
    products(&kernel, 1, m, k);
}

// y = x @ (q * scale)^T; scale (n, groups): one float per output row and group of k / groups columns.
void llk_linear_q8(const float* x, const int8_t* q, const float* scale, int64_t groups, float* y,
                   int64_t m, int64_t k, int64_t n) {
    const FlushSubnormals flush;
    quantized_products(each_part<Q8>(1, [&](int) { return Q8{q, scale, k, groups}; }), &n, 1, x, y, m, k);
}

// y = x @ (d * q + m)^T; qs (n, k / 2) nibbles, d and mins (n, groups) fp16 bits; k / groups % 32 == 0.
void llk_linear_q4(const float* x, const uint8_t* qs, const uint16_t* d, const uint16_t* mins, int64_t groups,
                   float* y, int64_t m, int64_t k, int64_t n) {
    const FlushSubnormals flush;
    quantized_products(each_part<Q4>(1, [&](int) { return Q4{qs, d, mins, k, groups}; }), &n, 1, x, y, m, k);
}

// x (m, k) times 1 to 3 weights of one format (see LlkLinear in linear.h) -> y (m, n_0 + n_1 + ..):
// one pool run for a layer's q, k, v (or w1, w3) kept as separate tensors; the decode step's products.
void llk_linear_parts(const LlkLinear* parts, int64_t n_parts, const float* x, float* y, int64_t m) {
    const FlushSubnormals flush;
    const int n = static_cast<int>(n_parts);
    const int64_t k = parts[0].k;
    int64_t ns[kMaxParts] = {}, column[kMaxParts] = {}, ldy = 0;
    for (int p = 0; p < n; ++p) ns[p] = parts[p].n, column[p] = ldy, ldy += ns[p];
    if (parts[0].format == 0) {
        const auto kernels = each_part<F32Kernel>(n, [&](int p) {
            return F32Kernel{Product{x, static_cast<const float*>(parts[p].w), y + column[p], m, k, ns[p], ldy}};
        });
        products(kernels.data(), n, m, k);
    } else if (parts[0].format == 1) {
        quantized_products(each_part<Q8>(n, [&](int p) {
            return Q8{static_cast<const int8_t*>(parts[p].w), static_cast<const float*>(parts[p].scale), k, parts[p].groups};
        }), ns, n, x, y, m, k);
    } else {
        quantized_products(each_part<Q4>(n, [&](int p) {
            return Q4{static_cast<const uint8_t*>(parts[p].w), static_cast<const uint16_t*>(parts[p].scale),
                      static_cast<const uint16_t*>(parts[p].min), k, parts[p].groups};
        }), ns, n, x, y, m, k);
    }
}

}  // extern "C"
