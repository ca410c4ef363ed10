// Checks every kernel of kernels/bert.cu, run on the CPU through shim.h, against a plain reference
// in double precision on random inputs: embedding + LayerNorm, residual + LayerNorm, attention
// over packed sequences (lengths 1, 33 and the 256 maximum; a key past a sequence's end must not
// leak in) and mean pooling with an empty sequence. Prints the largest errors; exits 1 on a miss.
//
//   g++ -std=c++20 -O2 -pthread -Ikernels/host kernels/host/test_kernels.cpp -o test_kernels
#include "shim.h"
#include "../bert.cu"

#include <cstdio>
#include <random>

static std::mt19937 rng(7);
static std::vector<__half> randoms(size_t n, float scale) {
    std::uniform_real_distribution<float> u(-scale, scale);
    std::vector<__half> v(n);
    for (auto &x : v) x = (__half)u(rng);
    return v;
}
static int failures = 0;
static void expect(const char *what, double err, double tol) {
    std::printf("%-40s max error %.2e (tolerance %.0e)\n", what, err, tol);
    if (!(err <= tol)) ++failures;
}
static void layer_norm_ref(std::vector<double> &v, const __half *g, const __half *b, double eps) {
    double mean = 0, var = 0;
    for (double x : v) mean += x;
    mean /= v.size();
    for (double x : v) var += (x - mean) * (x - mean);
    var /= v.size();
    for (size_t c = 0; c < v.size(); ++c)
        v[c] = (v[c] - mean) / std::sqrt(var + eps) * (double)g[c] + (double)b[c];
}

int main() {
    const int hidden = 384, heads = 12, vocab = 50, positions = 300;
    const float eps = 1e-12f;
    const dim3 rows_block{256, 1, 1};

    // embed_layer_norm
    const int tokens = 19;
    auto word = randoms((size_t)vocab * hidden, 1.f), pos_type = randoms((size_t)positions * hidden, 1.f);
    auto gamma = randoms(hidden, 2.f), beta = randoms(hidden, 0.5f);
    std::vector<uint32_t> ids(tokens), pos(tokens);
    for (int t = 0; t < tokens; ++t) ids[t] = (t * 7) % vocab, pos[t] = (t * 13) % positions;
    std::vector<__half> x((size_t)tokens * hidden);
    launch({(unsigned)(tokens + 7) / 8, 1, 1}, rows_block, [&] {
        embed_layer_norm(ids.data(), pos.data(), tokens, hidden, word.data(), pos_type.data(),
                         gamma.data(), beta.data(), eps, x.data());
    });
    double err = 0;
    for (int t = 0; t < tokens; ++t) {
        std::vector<double> v(hidden);
        for (int c = 0; c < hidden; ++c)
            v[c] = (double)word[ids[t] * hidden + c] + (double)pos_type[pos[t] * hidden + c];
        layer_norm_ref(v, gamma.data(), beta.data(), eps);
        for (int c = 0; c < hidden; ++c) err = std::max(err, std::abs(v[c] - (double)x[t * hidden + c]));
    }
    expect("embed_layer_norm", err, 5e-3);

    // residual_layer_norm (in place on x)
    auto y = randoms((size_t)tokens * hidden, 3.f);
    auto before = x;
    launch({(unsigned)(tokens + 7) / 8, 1, 1}, rows_block, [&] {
        residual_layer_norm(y.data(), tokens, hidden, gamma.data(), beta.data(), eps, x.data());
    });
    err = 0;
    for (int t = 0; t < tokens; ++t) {
        std::vector<double> v(hidden);
        for (int c = 0; c < hidden; ++c) v[c] = (double)y[t * hidden + c] + (double)before[t * hidden + c];
        layer_norm_ref(v, gamma.data(), beta.data(), eps);
        for (int c = 0; c < hidden; ++c) err = std::max(err, std::abs(v[c] - (double)x[t * hidden + c]));
    }
    expect("residual_layer_norm", err, 5e-3);

    // attention over packed sequences
    const std::vector<uint32_t> offsets{0, 1, 34, 290};
    const int n = 3, total = 290, head = 32;
    auto qkv = randoms((size_t)total * 3 * hidden, 2.f);
    std::vector<__half> ctx((size_t)total * hidden, (__half)99.f);
    const float scale = 1.f / std::sqrt((float)head);
    launch({(unsigned)n, (unsigned)heads, 1}, {128, 1, 1}, [&] {
        attention(qkv.data(), offsets.data(), hidden, scale, ctx.data());
    });
    err = 0;
    for (int s = 0; s < n; ++s) {
        const int start = offsets[s], len = offsets[s + 1] - start;
        for (int h = 0; h < heads; ++h) {
            for (int q = 0; q < len; ++q) {
                const __half *qr = &qkv[(size_t)(start + q) * 3 * hidden + h * head];
                std::vector<double> p(len);
                double best = -1e300, sum = 0;
                for (int j = 0; j < len; ++j) {
                    const __half *kr = &qkv[(size_t)(start + j) * 3 * hidden + hidden + h * head];
                    double dot = 0;
                    for (int d = 0; d < head; ++d) dot += (double)qr[d] * (double)kr[d];
                    p[j] = dot * scale;
                    best = std::max(best, p[j]);
                }
                for (auto &e : p) sum += (e = std::exp(e - best));
                for (int d = 0; d < head; ++d) {
                    double o = 0;
                    for (int j = 0; j < len; ++j)
                        o += p[j] / sum * (double)qkv[(size_t)(start + j) * 3 * hidden + 2 * hidden + h * head + d];
                    err = std::max(err, std::abs(o - (double)ctx[(size_t)(start + q) * hidden + h * head + d]));
                }
            }
        }
    }
    expect("attention (lengths 1, 33, 256)", err, 2e-3);

    // mean_pool_normalise, with an empty sequence
    const std::vector<uint32_t> pool_offsets{0, 4, 4, 19};
    std::vector<float> out((size_t)3 * hidden, 99.f);
    launch({1, 1, 1}, rows_block, [&] {
        mean_pool_normalise(x.data(), pool_offsets.data(), 3, hidden, out.data());
    });
    err = 0;
    for (int s = 0; s < 3; ++s) {
        std::vector<double> m(hidden, 0.0);
        for (uint32_t t = pool_offsets[s]; t < pool_offsets[s + 1]; ++t)
            for (int c = 0; c < hidden; ++c) m[c] += (double)x[t * hidden + c];
        double norm = 0;
        for (double v : m) norm += v * v;
        norm = std::max(std::sqrt(norm), 1e-12);
        for (int c = 0; c < hidden; ++c) err = std::max(err, std::abs(m[c] / norm - out[s * hidden + c]));
    }
    expect("mean_pool_normalise (one sequence empty)", err, 1e-5);

    std::printf("%s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
