// Runs CUDA kernels on the CPU for testing, without a GPU: kernels/bert.cu is compiled as C++ with
// this header forced in (`g++ -x c++ -include shim.h`). A launch runs its blocks one after another;
// a block's threads are real threads, so __syncthreads is a barrier over the block, warp
// shuffles exchange through a per-warp buffer between two warp barriers, and `__shared__` becomes
// `static` (one copy, used by one block at a time). __half is _Float16, rounded to nearest like
// __float2half. Only what bert.cu uses is defined.
#pragma once
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

typedef _Float16 __half;
struct __half2 {
    __half x, y;
};
struct float2 {
    float x, y;
};
inline __half __float2half(float f) { return (__half)f; }
inline float __half2float(__half h) { return (float)h; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline float2 __half22float2(__half2 h) { return {(float)h.x, (float)h.y}; }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

struct WarpState {
    std::barrier<> sync{32};
    float slots[32];
};
inline thread_local std::barrier<> *block_barrier;
inline thread_local WarpState *warp_state;

inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { warp_state->sync.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
    const unsigned lane = threadIdx.x % 32;
    warp_state->slots[lane] = v;
    __syncwarp();
    const float r = warp_state->slots[lane ^ offset];
    __syncwarp();
    return r;
}

// Runs `kernel` over `grid` blocks of `block` threads (block.x a multiple of 32, y = z = 1).
template <class F>
void launch(dim3 grid, dim3 block, F kernel) {
    blockDim = block;
    gridDim = grid;
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::barrier<> bar(block.x);
            std::vector<std::unique_ptr<WarpState>> warps;
            for (unsigned w = 0; w < block.x / 32; ++w) warps.push_back(std::make_unique<WarpState>());
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < block.x; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {bx, by, 0};
                    block_barrier = &bar;
                    warp_state = warps[t / 32].get();
                    kernel();
                });
            }
            for (auto &th : threads) th.join();
        }
    }
}
