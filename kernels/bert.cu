// The non-matmul steps of the project's BERT forward on CUDA (src/embed/cuda_bert.rs), f16 storage
// with f32 arithmetic. Tokens are *packed*: a pass is the concatenation of its sequences' token
// rows, `offsets[s]..offsets[s + 1]` being sequence s, so there is no padding and no mask; every
// matmul (with its bias, and GELU for the feed-forward) is one cuBLASLt call between these kernels.
//
//   embed_layer_norm   x[t] = LN(word[ids[t]] + pos_type[pos[t]])           one warp per token
//   attention          ctx = softmax(q kᵀ / √d) v per (sequence, head)      one block per pair
//   residual_layer_norm x[t] = LN(y[t] + x[t])                              one warp per token
//   mean_pool_normalise out[s] = normalise(mean of x over sequence s)       one warp per sequence
//
// Compiled to PTX by build.rs (nvcc, sm_90 by default) when the `cuda` feature is on.

#include <cuda_fp16.h>
#include <stdint.h>

#define WARP 32
// Widest model row handled by the warp-per-row kernels: 32 lanes × 24 values.
#define MAX_PER_LANE 24
// Loops over a lane's `per` values, fully unrolled (with a guard) so the per-lane arrays indexed by
// it stay in registers.
#define LANE_LOOP(i) _Pragma("unroll") for (int i = 0; i < MAX_PER_LANE; ++i) if (i < per)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// LayerNorm of the `per` values a lane holds (columns lane, lane + 32, ...), written to `out`.
__device__ __forceinline__ void layer_norm_lane(
    float *v, int per, int hidden, const __half *gamma, const __half *beta, float eps,
    __half *out, int lane) {
    float sum = 0.f;
    LANE_LOOP(i) sum += v[i];
    const float mean = warp_sum(sum) / hidden;
    float sq = 0.f;
    LANE_LOOP(i) {
        const float d = v[i] - mean;
        sq += d * d;
    }
    const float inv = rsqrtf(warp_sum(sq) / hidden + eps);
    LANE_LOOP(i) {
        const int c = lane + i * WARP;
        out[c] = __float2half((v[i] - mean) * inv * __half2float(gamma[c]) + __half2float(beta[c]));
    }
}

// x[t] = LayerNorm(word[ids[t]] + pos_type[pos[t]]); pos_type already holds token type 0's row.
// hidden must be a multiple of 32 and at most 32 * MAX_PER_LANE.
extern "C" __global__ void embed_layer_norm(
    const uint32_t *ids, const uint32_t *pos, int tokens, int hidden,
    const __half *word, const __half *pos_type, const __half *gamma, const __half *beta,
    float eps, __half *x) {
    const int lane = threadIdx.x % WARP;
    const int t = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (t >= tokens) return;
    const int per = hidden / WARP;
    const __half *w = word + (size_t)ids[t] * hidden;
    const __half *p = pos_type + (size_t)pos[t] * hidden;
    float v[MAX_PER_LANE];
    LANE_LOOP(i) {
        const int c = lane + i * WARP;
        v[i] = __half2float(w[c]) + __half2float(p[c]);
    }
    layer_norm_lane(v, per, hidden, gamma, beta, eps, x + (size_t)t * hidden, lane);
}

// x[t] = LayerNorm(y[t] + x[t]), in place on x (each warp reads its row before writing it).
extern "C" __global__ void residual_layer_norm(
    const __half *y, int tokens, int hidden, const __half *gamma, const __half *beta, float eps,
    __half *x) {
    const int lane = threadIdx.x % WARP;
    const int t = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (t >= tokens) return;
    const int per = hidden / WARP;
    const __half *yr = y + (size_t)t * hidden;
    __half *xr = x + (size_t)t * hidden;
    float v[MAX_PER_LANE];
    LANE_LOOP(i) {
        const int c = lane + i * WARP;
        v[i] = __half2float(yr[c]) + __half2float(xr[c]);
    }
    layer_norm_lane(v, per, hidden, gamma, beta, eps, xr, lane);
}

// Attention heads of 32 dimensions (one per lane) over sequences of at most ATT_MAX_LEN tokens.
#define HEAD_DIM 32
#define ATT_MAX_LEN 256
#define ATT_WARPS 4
// K rows in shared memory as half2 with an odd stride in 32-bit words, so the 32 lanes reading
// 32 different keys hit 32 different banks.
#define K_STRIDE (HEAD_DIM / 2 + 1)

// Self-attention of one (sequence, head) pair per block (grid: sequences × heads, ATT_WARPS warps).
// qkv is the fused projection's output, [tokens, 3 * hidden] (query | key | value, bias added),
// ctx is [tokens, hidden] with head h in columns h * 32 .. h * 32 + 32. Each warp takes query rows
// in turn: lanes score keys lane, lane + 32, ... against the whole query, the row's softmax is
// taken in f32 in shared memory, and lane d sums the values' dimension d.
extern "C" __global__ void attention(
    const __half *qkv, const uint32_t *offsets, int hidden, float scale, __half *ctx) {
    __shared__ __half2 ks[ATT_MAX_LEN * K_STRIDE];
    __shared__ __half vs[ATT_MAX_LEN * HEAD_DIM];
    __shared__ float qs[ATT_WARPS][HEAD_DIM];
    __shared__ float ps[ATT_WARPS][ATT_MAX_LEN];

    const int s = blockIdx.x, h = blockIdx.y;
    const int start = offsets[s];
    int len = offsets[s + 1] - start;
    if (len > ATT_MAX_LEN) len = ATT_MAX_LEN;  // the host never sends longer sequences
    const int row = 3 * hidden;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const __half *base = qkv + (size_t)start * row + h * HEAD_DIM;

    for (int i = threadIdx.x; i < len * HEAD_DIM; i += blockDim.x) {
        const int j = i / HEAD_DIM, d = i % HEAD_DIM;
        const __half *r = base + (size_t)j * row;
        vs[i] = r[2 * hidden + d];
        if (d % 2 == 0) ks[j * K_STRIDE + d / 2] = __halves2half2(r[hidden + d], r[hidden + d + 1]);
    }
    __syncthreads();

    for (int q = warp; q < len; q += ATT_WARPS) {
        qs[warp][lane] = __half2float(base[(size_t)q * row + lane]) * scale;
        __syncwarp();
        float qr[HEAD_DIM];
#pragma unroll
        for (int d = 0; d < HEAD_DIM; ++d) qr[d] = qs[warp][d];
        float best = -INFINITY;
        for (int j = lane; j < len; j += WARP) {
            float dot = 0.f;
#pragma unroll
            for (int d2 = 0; d2 < HEAD_DIM / 2; ++d2) {
                const float2 k = __half22float2(ks[j * K_STRIDE + d2]);
                dot += qr[2 * d2] * k.x + qr[2 * d2 + 1] * k.y;
            }
            ps[warp][j] = dot;
            best = fmaxf(best, dot);
        }
        best = warp_max(best);
        float sum = 0.f;
        for (int j = lane; j < len; j += WARP) {
            const float e = __expf(ps[warp][j] - best);
            ps[warp][j] = e;
            sum += e;
        }
        const float inv = 1.f / warp_sum(sum);
        __syncwarp();
        float acc = 0.f;
        for (int j = 0; j < len; ++j) acc += ps[warp][j] * __half2float(vs[j * HEAD_DIM + lane]);
        ctx[(size_t)(start + q) * hidden + h * HEAD_DIM + lane] = __float2half(acc * inv);
        __syncwarp();
    }
}

// out[s] = L2-normalised mean of x's rows offsets[s] .. offsets[s + 1] (f32, [sequences, hidden]);
// an empty sequence gives zeros.
extern "C" __global__ void mean_pool_normalise(
    const __half *x, const uint32_t *offsets, int sequences, int hidden, float *out) {
    const int lane = threadIdx.x % WARP;
    const int s = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (s >= sequences) return;
    const int per = hidden / WARP;
    const int start = offsets[s], end = offsets[s + 1];
    float v[MAX_PER_LANE];
    LANE_LOOP(i) v[i] = 0.f;
    for (int t = start; t < end; ++t) {
        const __half *r = x + (size_t)t * hidden;
        LANE_LOOP(i) v[i] += __half2float(r[lane + i * WARP]);
    }
    float sq = 0.f;
    LANE_LOOP(i) sq += v[i] * v[i];
    // mean / |mean| = sum / |sum|: the count cancels.
    const float inv = 1.f / fmaxf(sqrtf(warp_sum(sq)), 1e-12f);
    LANE_LOOP(i) out[(size_t)s * hidden + lane + i * WARP] = v[i] * inv;
}
