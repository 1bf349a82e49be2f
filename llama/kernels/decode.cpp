// One decode step of a Llama's transformer layers on the CPU: a few rows of one token each,
// through every layer in one call.
//
// A decode step of a small model does little work per operation, so calling torch for each
// norm, rotation, attention and activation (about 25 operations per layer) costs more than the
// arithmetic: SmolLM2's 30 layers spent ~7 ms a step outside the products, about as long as
// llama.cpp takes for its whole step. Here they are plain loops over the rows, and the products
// are cpu.cpp's. The algorithm is Meta's in fp32 (model.py): RMSNorm, interleaved RoPE, softmax
// attention over each row's cached positions, SwiGLU, residuals; only summation order and the
// exponential's last bits differ from torch's.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "linear.h"
#include "simd.h"

extern "C" {
void llk_parallel_for(void (*fn)(const void* ctx, int64_t i), const void* ctx, int64_t n);
void llk_linear_parts(const LlkLinear* parts, int64_t n_parts, const float* x, float* y, int64_t m);

// A layer's weights and key/value cache. Projections that read the same input come as one fused
// weight (parts == 1: rows of q, k, v or of w1, w3 one after the other) or as separate ones.
struct LlkLayer {
    const float* attention_norm;
    const float* ffn_norm;
    LlkLinear qkv[3];
    int64_t qkv_parts;
    LlkLinear wo;
    LlkLinear w13[2];
    int64_t w13_parts;
    LlkLinear w2;
    float* cache_k;  // (max_batch_size, n_kv_heads, max_seq_len, head_dim)
    float* cache_v;
};

struct LlkDims {
    int64_t dim, n_heads, n_kv_heads, head_dim, hidden, max_batch_size, max_seq_len;
    float norm_eps;
};
}

namespace {

using namespace llk;
using S = Simd;

// x (m, k) through a projection's weights, one fused weight or one per output (q, k, v; w1, w3),
// into buf (m, total): each row's outputs side by side either way.
void project(const LlkLinear* parts, int64_t n_parts, int64_t total, const float* x, int64_t m, std::vector<float>& buf) {
    buf.resize(m * total);
    llk_linear_parts(parts, n_parts, x, buf.data(), m);
}

// e^x for each x[i], to about 1 ulp: e^x = 2^n * e^r with r = x - n ln 2, |r| <= ln 2 / 2, e^r by
// its Taylor series to r^7 (error below 6e-9). Plain loops that the compiler vectorizes. Below
// e^-87 (near the smallest normal float) the result is 0: subnormal floats slow every operation
// that meets them (see FlushSubnormals in simd.h).
void exp_inplace(float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const float v = std::min(std::max(x[i], -87.0f), 88.0f);
        const float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
        float r = v - k * 0.693145751953125f;  // ln 2 in two parts: k * hi is exact
        r = r - k * 1.428606765330187e-06f;
        float p = 1.0f / 5040.0f;
        p = p * r + 1.0f / 720.0f;
        p = p * r + 1.0f / 120.0f;
        p = p * r + 1.0f / 24.0f;
        p = p * r + 1.0f / 6.0f;
        p = p * r + 0.5f;
        p = p * r + 1.0f;
        p = p * r + 1.0f;
        const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
        float scale;
        std::memcpy(&scale, &bits, sizeof scale);
        x[i] = x[i] < -87.0f ? 0.0f : p * scale;
    }
}

// Meta's RMSNorm: x * rsqrt(mean(x^2) + eps) * weight.
void rms_norm(const float* x, const float* weight, float* out, int64_t n, float eps) {
    const float r = 1.0f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = (x[i] * r) * weight[i];
}

// Meta's RoPE on one head: pairs (x[2j], x[2j + 1]) times cos_sin[j] = (cos, sin), as complex numbers.
void rotate(float* x, const float* cos_sin, int64_t head_dim) {
    for (int64_t j = 0; j < head_dim / 2; ++j) {
        const float a = x[2 * j], b = x[2 * j + 1], c = cos_sin[2 * j], s = cos_sin[2 * j + 1];
        x[2 * j] = a * c - b * s;
        x[2 * j + 1] = a * s + b * c;
    }
}

// out += p[t] * values[t] for t < len, the head_dim / W vectors of out held in registers
// (V: head_dim / W where the head size is one of the common ones, else 0: any size).
template <int V>
void weighted_sum(const float* p, const float* values, int64_t len, int64_t head_dim, float* out) {
    if constexpr (V > 0) {
        S::V acc[V];
        for (int c = 0; c < V; ++c) acc[c] = S::zero();
        for (int64_t t = 0; t < len; ++t) {
            const S::V pt = S::set1(p[t]);
            for (int c = 0; c < V; ++c) acc[c] = S::fma(pt, S::load(values + t * head_dim + c * S::W), acc[c]);
        }
        for (int c = 0; c < V; ++c) S::store(out + c * S::W, acc[c]);
    } else {
        std::fill(out, out + head_dim, 0.0f);
        for (int64_t t = 0; t < len; ++t)
            for (int64_t c = 0; c < head_dim; ++c) out[c] += p[t] * values[t * head_dim + c];
    }
}

// One query head over positions 0..len-1 of its key/value head: softmax(q k^T / sqrt(d)) v.
void attend(const float* q, const float* keys, const float* values, int64_t len, int64_t head_dim, float* out,
            std::vector<float>& scores) {
    scores.resize(len);
    float* s = scores.data();
    const float root = std::sqrt(static_cast<float>(head_dim));
    for (int64_t t = 0; t < len; ++t) s[t] = dot(q, keys + t * head_dim, head_dim);
    // The softmax's passes over the scores, W at a time: as scalar loops each add or max waited
    // for the one before (a quarter of a batch-4 SmolLM2 step at a few hundred positions).
    S::V top_v = S::set1(-INFINITY);
    int64_t t = 0;
    for (; t + S::W <= len; t += S::W) {
        const S::V v = S::div(S::load(s + t), S::set1(root));
        S::store(s + t, v);
        top_v = S::max(top_v, v);
    }
    float top = S::hmax(top_v);
    for (; t < len; ++t) top = std::max(top, s[t] /= root);
    for (t = 0; t < len; ++t) s[t] -= top;
    exp_inplace(s, len);
    S::V total_v = S::zero();
    for (t = 0; t + S::W <= len; t += S::W) total_v = S::add(total_v, S::load(s + t));
    float total = S::sum(total_v);
    for (; t < len; ++t) total += s[t];
    for (t = 0; t < len; ++t) {
        const float p = s[t] / total;
        s[t] = p < std::numeric_limits<float>::min() ? 0.0f : p;  // no subnormal weights (see exp_inplace)
    }
    if (head_dim == 4 * S::W) weighted_sum<4>(s, values, len, head_dim, out);
    else if (head_dim == 8 * S::W) weighted_sum<8>(s, values, len, head_dim, out);
    else weighted_sum<0>(s, values, len, head_dim, out);
}

// The attention of every (row, query head) of a step, split between the pool's threads.
struct Attention {
    const LlkLayer* layer;
    const LlkDims* dims;
    const int64_t* positions;
    int64_t cache_row;
    const float* queries;  // (m, n_heads, head_dim), rotated
    float* out;            // (m, n_heads, head_dim)

    static void run(const void* ctx, int64_t job) {
        const Attention& a = *static_cast<const Attention*>(ctx);
        const LlkDims& D = *a.dims;
        const int64_t i = job / D.n_heads, head = job % D.n_heads, hd = D.head_dim;
        const int64_t at = ((a.cache_row + i) * D.n_kv_heads + head / (D.n_heads / D.n_kv_heads)) * D.max_seq_len * hd;
        const int64_t offset = (i * D.n_heads + head) * hd;
        thread_local std::vector<float> scores;
        attend(a.queries + offset, a.layer->cache_k + at, a.layer->cache_v + at, a.positions[i] + 1, hd, a.out + offset, scores);
    }
};

struct Scratch {
    std::vector<float> norm, qkv, queries, heads, proj, h13, act;
};

void layer_step(const LlkLayer& L, const LlkDims& D, float* h, int64_t m, const int64_t* positions, int64_t cache_row,
                const float* rope, Scratch& s) {
    const int64_t dim = D.dim, hd = D.head_dim;
    s.norm.resize(m * dim);
    for (int64_t i = 0; i < m; ++i) rms_norm(h + i * dim, L.attention_norm, s.norm.data() + i * dim, dim, D.norm_eps);
    const int64_t qkv_width = (D.n_heads + 2 * D.n_kv_heads) * hd;  // q | k | v per row
    project(L.qkv, L.qkv_parts, qkv_width, s.norm.data(), m, s.qkv);

    // Rotate each row's queries and keys; its key and value join the cache at its position.
    s.queries.resize(m * D.n_heads * hd);
    s.heads.resize(m * D.n_heads * hd);
    for (int64_t i = 0; i < m; ++i) {
        const int64_t pos = positions[i];
        const float* cos_sin = rope + pos * hd;  // (head_dim / 2, 2) per position
        float* q = s.queries.data() + i * D.n_heads * hd;
        const float* qkv = s.qkv.data() + i * qkv_width;
        std::memcpy(q, qkv, D.n_heads * hd * sizeof(float));
        for (int64_t head = 0; head < D.n_heads; ++head) rotate(q + head * hd, cos_sin, hd);
        for (int64_t g = 0; g < D.n_kv_heads; ++g) {
            const int64_t at = (((cache_row + i) * D.n_kv_heads + g) * D.max_seq_len + pos) * hd;
            std::memcpy(L.cache_k + at, qkv + (D.n_heads + g) * hd, hd * sizeof(float));
            rotate(L.cache_k + at, cos_sin, hd);
            std::memcpy(L.cache_v + at, qkv + (D.n_heads + D.n_kv_heads + g) * hd, hd * sizeof(float));
        }
    }
    const Attention attention{&L, &D, positions, cache_row, s.queries.data(), s.heads.data()};
    llk_parallel_for(&Attention::run, &attention, m * D.n_heads);

    project(&L.wo, 1, dim, s.heads.data(), m, s.proj);
    for (int64_t c = 0; c < m * dim; ++c) h[c] += s.proj[c];

    for (int64_t i = 0; i < m; ++i) rms_norm(h + i * dim, L.ffn_norm, s.norm.data() + i * dim, dim, D.norm_eps);
    project(L.w13, L.w13_parts, 2 * D.hidden, s.norm.data(), m, s.h13);  // h1 | h3 per row
    s.act.resize(m * D.hidden);
    for (int64_t i = 0; i < m; ++i) {
        float* a = s.act.data() + i * D.hidden;
        const float *h1 = s.h13.data() + i * 2 * D.hidden, *h3 = h1 + D.hidden;
        for (int64_t c = 0; c < D.hidden; ++c) a[c] = -h1[c];
        exp_inplace(a, D.hidden);
        for (int64_t c = 0; c < D.hidden; ++c) a[c] = h1[c] / (1.0f + a[c]) * h3[c];  // silu(h1) * h3
    }
    project(&L.w2, 1, dim, s.act.data(), m, s.proj);
    for (int64_t c = 0; c < m * dim; ++c) h[c] += s.proj[c];
}

}  // namespace

extern "C" {

// h (m, dim): the rows' embeddings in, their last layer's output out. Row i is at position
// positions[i] of cache row cache_row + i; rope (positions, head_dim / 2, 2) holds cos and sin.
// Returns 0, or -1 if a position or cache row is outside the caches (nothing is written then).
int llk_decode_layers(const LlkLayer* layers, int64_t n_layers, const LlkDims* dims, float* h, int64_t m,
                      const int64_t* positions, int64_t cache_row, const float* rope) {
    const LlkDims& D = *dims;
    if (cache_row < 0 || cache_row + m > D.max_batch_size) return -1;
    for (int64_t i = 0; i < m; ++i)
        if (positions[i] < 0 || positions[i] >= D.max_seq_len) return -1;
    thread_local Scratch scratch;
    const FlushSubnormals flush;
    for (int64_t l = 0; l < n_layers; ++l) layer_step(layers[l], D, h, m, positions, cache_row, rope, scratch);
    return 0;
}

}  // extern "C"
