// cuda_emu.h: the parts of CUDA that deeplab_ops.cu uses, on the CPU. A launch runs its blocks
// one after another on a block's worth of OS threads, so __syncthreads (a barrier over the
// block) and __shfl_down_sync (a barrier over the warp around an exchange) have their CUDA
// meaning. __shared__ becomes a function-local static: one block runs at a time.
#pragma once
#include <barrier>
#include <cassert>
#include <math.h>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __shared__ static

namespace emu {
constexpr unsigned kWarp = 32;

// The running block's barriers and the warps' exchange slots.
struct Block {
  explicit Block(unsigned threads) : all(threads), lanes(threads) {
    for (unsigned w = 0; w < threads / kWarp; ++w) warps.push_back(std::make_unique<std::barrier<>>(kWarp));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> lanes;
};

inline Block* running = nullptr;
inline std::mutex atomics;
// Held for the whole of a launch (a template: a static inside it would be one per kernel).
inline std::mutex launches;

// Runs `kernel()` as a `grid` x `block` launch (one dimension, `block` a multiple of the warp).
// The block's threads are started once and run the blocks in turn, meeting at a barrier after
// each, so no thread starts a block while another still uses the last one's shared memory.
// Launches from several host threads run one at a time.
template <class F>
void launch(unsigned grid, unsigned block, F kernel) {
  assert(block > 0 && block % kWarp == 0);
  std::lock_guard<std::mutex> lock(launches);
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  Block state(block);
  running = &state;
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned t = 0; t < block; ++t)
    threads.emplace_back([&kernel, &state, grid, t] {
      threadIdx = {t, 1, 1};
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx = {b, 1, 1};
        kernel();
        state.all.arrive_and_wait();
      }
    });
  for (auto& t : threads) t.join();
  running = nullptr;
}
}  // namespace emu

inline void __syncthreads() { emu::running->all.arrive_and_wait(); }

// Lane `lane + delta` of the warp's `v`, or the caller's own when that lane is past the warp.
inline float __shfl_down_sync(unsigned, float v, int delta) {
  emu::Block& b = *emu::running;
  unsigned lane = threadIdx.x % emu::kWarp, base = threadIdx.x - lane;
  auto& bar = *b.warps[threadIdx.x / emu::kWarp];
  b.lanes[threadIdx.x] = v;
  bar.arrive_and_wait();
  float r = lane + delta < emu::kWarp ? b.lanes[base + lane + delta] : v;
  bar.arrive_and_wait();
  return r;
}

inline float atomicAdd(float* p, float v) {
  std::lock_guard<std::mutex> lock(emu::atomics);
  float old = *p;
  *p = old + v;
  return old;
}

// CUDA's rsqrtf is within 2 ulp; this is the correctly rounded quotient.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
