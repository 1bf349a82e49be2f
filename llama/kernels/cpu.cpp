// Products of a few activation rows (decode steps, small batches) with a weight stored as
// nn.Linear does (n, k): fp32, int8 with float scales, or 4-bit groups with fp16 scale and min.
//
// Such products are bound by reading the weight, so each weight row is read from memory once for
// all activation rows, dequantized in registers exactly as the reference dequantizes it, and
// multiplied in fp32. Plain C ABI and no torch headers, so that it builds in seconds; the
// instruction set is chosen at build time (-march=native): AVX-512, AVX2+FMA, or portable C++.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <pthread.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

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

// --- vectors of W floats: the kernels below are written once against this interface ---

struct Scalar {
    static constexpr int W = 1;
    using V = float;
    static V zero() { return 0.0f; }
    static V load(const float* p) { return *p; }
    static V set1(float v) { return v; }
    static V mul(V a, V b) { return a * b; }
    static V fma(V a, V b, V c) { return a * b + c; }
    static float sum(V v) { return v; }
    static V int8(const int8_t* p) { return static_cast<float>(*p); }
    static V nibble_lo(const uint8_t* p) { return static_cast<float>(*p & 15); }
    static V nibble_hi(const uint8_t* p) { return static_cast<float>(*p >> 4); }
};

#if defined(__AVX512F__)
#define LLK_ISA "avx512"
struct Simd {
    static constexpr int W = 16;
    using V = __m512;
    static V zero() { return _mm512_setzero_ps(); }
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static V set1(float v) { return _mm512_set1_ps(v); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static float sum(V v) { return _mm512_reduce_add_ps(v); }
    static __m512i bytes(const void* p) {
        return _mm512_cvtepu8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    }
    static V int8(const int8_t* p) {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    }
    static V nibble_lo(const uint8_t* p) {
        return _mm512_cvtepi32_ps(_mm512_and_si512(bytes(p), _mm512_set1_epi32(15)));
    }
    static V nibble_hi(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes(p), 4)); }
};
#elif defined(__AVX2__) && defined(__FMA__)
#define LLK_ISA "avx2"
struct Simd {
    static constexpr int W = 8;
    using V = __m256;
    static V zero() { return _mm256_setzero_ps(); }
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static V set1(float v) { return _mm256_set1_ps(v); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static float sum(V v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
    static __m256i bytes(const void* p) {
        return _mm256_cvtepu8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
    }
    static V int8(const int8_t* p) {
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    }
    static V nibble_lo(const uint8_t* p) {
        return _mm256_cvtepi32_ps(_mm256_and_si256(bytes(p), _mm256_set1_epi32(15)));
    }
    static V nibble_hi(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes(p), 4)); }
};
#else
#define LLK_ISA "portable"
using Simd = Scalar;
#endif

// --- weight formats: a weight row's W values at columns c + J.., dequantized as the reference does.
// J is a compile-time offset into a run of 32 columns starting at c (c a multiple of 32 for Q4).
// Columns come in groups that share their parameters (the whole row for fp32 and per-row int8);
// row_scale multiplies a whole output (1 where the format scales in the loads).

struct F32 {
    const float* w;
    int64_t k;
    int64_t group() const { return k; }
    float row_scale(int64_t) const { return 1.0f; }
    template <class S> struct Params {};
    template <class S> Params<S> params(int64_t, int64_t) const { return {}; }
    template <class S, int J> typename S::V load(int64_t row, const Params<S>&, int64_t c) const {
        return S::load(w + row * k + c + J);
    }
};

// int8 with one float scale per output row, applied to the output: one multiply per row, not
// per weight (the same products up to rounding).
struct Q8Row {
    const int8_t* q;
    const float* scale;
    int64_t k;
    int64_t group() const { return k; }
    float row_scale(int64_t row) const { return scale[row]; }
    template <class S> struct Params {};
    template <class S> Params<S> params(int64_t, int64_t) const { return {}; }
    template <class S, int J> typename S::V load(int64_t row, const Params<S>&, int64_t c) const {
        return S::int8(q + row * k + c + J);
    }
};

// int8 times a float scale per group of columns (GGUF Q8_0: 32), dequantized in registers.
struct Q8Group {
    const int8_t* q;
    const float* scale;
    int64_t k, groups;
    int64_t group() const { return k / groups; }
    float row_scale(int64_t) const { return 1.0f; }
    template <class S> struct Params { typename S::V s; };
    template <class S> Params<S> params(int64_t row, int64_t g) const { return {S::set1(scale[row * groups + g])}; }
    template <class S, int J> typename S::V load(int64_t row, const Params<S>& p, int64_t c) const {
        return S::mul(S::int8(q + row * k + c + J), p.s);
    }
};

// 4-bit values q in 0..15, value = d * q + m per group. Nibbles in GGUF Q4_0/Q4_1 order: for each
// 32 columns 16 bytes, byte j holding column j (low nibble) and column j + 16 (high nibble).
struct Q4 {
    const uint8_t* qs;
    const uint16_t* d;
    const uint16_t* m;
    int64_t k, groups;
    int64_t group() const { return k / groups; }
    float row_scale(int64_t) const { return 1.0f; }
    template <class S> struct Params { typename S::V d, m; };
    template <class S> Params<S> params(int64_t row, int64_t g) const {
        const int64_t i = row * groups + g;
        return {S::set1(half_to_float(d[i])), S::set1(half_to_float(m[i]))};
    }
    template <class S, int J> typename S::V load(int64_t row, const Params<S>& p, int64_t c) const {
        const uint8_t* block = qs + row * (k / 2) + c / 2;
        const typename S::V q = J < 16 ? S::nibble_lo(block + J) : S::nibble_hi(block + J - 16);
        return S::fma(q, p.d, p.m);  // d * q is exact in fp32: one rounding, as d * q + m in C
    }
};

struct Product {
    const float* x;  // (m, k)
    float* y;        // (m, n)
    int64_t m, k, n;
};

// acc[r][i] += weight row r's values at columns c + J.. times activation row i's, for J = J0,
// J0 + W, .. < End: one weight vector loaded and dequantized per R * M products.
template <class S, class Fmt, int R, int M, int J, int End>
inline void step(const Fmt& f, const typename Fmt::template Params<S> (&par)[R], const float* x, int64_t k,
                 int64_t row, int64_t c, typename S::V (&acc)[R][M]) {
    if constexpr (J < End) {
        for (int r = 0; r < R; ++r) {
            const typename S::V w = f.template load<S, J>(row + r, par[r], c);
            for (int i = 0; i < M; ++i) acc[r][i] = S::fma(w, S::load(x + i * k + c + J), acc[r][i]);
        }
        step<S, Fmt, R, M, J + S::W, End>(f, par, x, k, row, c, acc);
    }
}

// R weight rows from `row` times M activation rows from `i0`: R * M accumulators of W lanes.
template <class S, class Fmt, int R, int M>
void tile(const Fmt& f, const Product& p, int64_t row, int64_t i0) {
    using T = typename S::V;
    T acc[R][M];
    float tail[R][M];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < M; ++i) acc[r][i] = S::zero(), tail[r][i] = 0.0f;
    const float* x = p.x + i0 * p.k;
    const int64_t size = f.group();
    for (int64_t g0 = 0, g = 0; g0 < p.k; g0 += size, ++g) {
        const int64_t end = g0 + size;
        typename Fmt::template Params<S> par[R];
        for (int r = 0; r < R; ++r) par[r] = f.template params<S>(row + r, g);
        int64_t c = g0;
        for (; c + 32 <= end; c += 32) step<S, Fmt, R, M, 0, 32>(f, par, x, p.k, row, c, acc);
        for (; c + S::W <= end; c += S::W) step<S, Fmt, R, M, 0, S::W>(f, par, x, p.k, row, c, acc);
        if (c < end) {  // fp32 and per-row int8 only: k is not a multiple of W
            typename Fmt::template Params<Scalar> one[R];
            for (int r = 0; r < R; ++r) one[r] = f.template params<Scalar>(row + r, g);
            for (; c < end; ++c) step<Scalar, Fmt, R, M, 0, 1>(f, one, x, p.k, row, c, tail);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < M; ++i)
            p.y[(i0 + i) * p.n + row + r] = (S::sum(acc[r][i]) + tail[r][i]) * f.row_scale(row + r);
}

// R weight rows against all activation rows, 4 at a time. At most 12 accumulators: AVX2 has 16
// vector registers, and the weight vector and an activation vector need two.
template <class S, class Fmt, int R>
void tiles(const Fmt& f, const Product& p, int64_t row) {
    int64_t i0 = 0;
    if constexpr (R * 4 <= 12)
        for (; i0 + 4 <= p.m; i0 += 4) tile<S, Fmt, R, 4>(f, p, row, i0);
    for (; i0 + 3 <= p.m; i0 += 3) tile<S, Fmt, R, 3>(f, p, row, i0);
    if (p.m - i0 == 2) tile<S, Fmt, R, 2>(f, p, row, i0);
    if (p.m - i0 == 1) tile<S, Fmt, R, 1>(f, p, row, i0);
}

// Weight rows [r0, r1) against all activation rows: a block of 4 (or 3) weight rows stays in cache
// while it meets each group of activation rows.
template <class S, class Fmt>
void rows(const Fmt& f, const Product& p, int64_t r0, int64_t r1) {
    const int block = p.m >= 4 ? 3 : 4;
    int64_t row = r0;
    for (; row + block <= r1; row += block) block == 3 ? tiles<S, Fmt, 3>(f, p, row) : tiles<S, Fmt, 4>(f, p, row);
    for (; row < r1; ++row) tiles<S, Fmt, 1>(f, p, row);
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
// Chunks of about this many weights: small enough that a descheduled worker holds up little.
constexpr int64_t kChunkWeights = 16 << 10;

template <class Fmt>
struct Job {
    Fmt f;
    Product p;
    int64_t chunk_rows;
    static void run_chunk(const void* ctx, int64_t c) {
        const Job& j = *static_cast<const Job*>(ctx);
        const int64_t r0 = c * j.chunk_rows, r1 = std::min(j.p.n, r0 + j.chunk_rows);
        rows<Simd>(j.f, j.p, r0, r1);
    }
};

template <class Fmt>
void product(const Fmt& f, const Product& p) {
    const int threads = pool().threads();
    if (threads == 1 || p.n * p.k < kMinParallelWeights) {
        rows<Simd>(f, p, 0, p.n);
        return;
    }
    // Multiples of 12 rows (tiles of 3 or 4); at least 4 chunks per thread where n allows.
    int64_t chunk_rows = std::max<int64_t>(1, kChunkWeights / p.k);
    chunk_rows = std::min<int64_t>(chunk_rows, p.n / (4 * threads));
    chunk_rows = std::max<int64_t>(12, (chunk_rows + 11) / 12 * 12);
    const Job<Fmt> job{f, p, chunk_rows};
    pool().run(&Job<Fmt>::run_chunk, &job, (p.n + chunk_rows - 1) / chunk_rows);
}

}  // namespace

extern "C" {

const char* llk_isa() { return LLK_ISA; }

void llk_set_threads(int n) { pool().set_threads(n); }

int llk_threads() { return pool().threads(); }

// y (m, n) = x (m, k) @ w (n, k)^T
void llk_linear_f32(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n) {
    product(F32{w, k}, Product{x, y, m, k, n});
}

// y = x @ (q * scale)^T; scale (n, groups): one float per output row and group of k / groups columns.
void llk_linear_q8(const float* x, const int8_t* q, const float* scale, int64_t groups, float* y,
                   int64_t m, int64_t k, int64_t n) {
    if (groups == 1) product(Q8Row{q, scale, k}, Product{x, y, m, k, n});
    else product(Q8Group{q, scale, k, groups}, Product{x, y, m, k, n});
}

// y = x @ (d * q + m)^T; qs (n, k / 2) nibbles, d and mins (n, groups) fp16 bits; k / groups % 32 == 0.
void llk_linear_q4(const float* x, const uint8_t* qs, const uint16_t* d, const uint16_t* mins, int64_t groups,
                   float* y, int64_t m, int64_t k, int64_t n) {
    product(Q4{qs, d, mins, k, groups}, Product{x, y, m, k, n});
}

}  // extern "C"
