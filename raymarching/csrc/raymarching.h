// Ray-marching kernels: launchers on raw device pointers.
//
// The .cu file includes no torch header so that it compiles in seconds;
// raymarching_bindings.cpp does the tensor checks, allocation and stream selection. Semantics are those of
// raymarching/_torch_impl.py (the PyTorch twin); shapes are given on every argument.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dfk {

// Occupancy grid: C cascades of G^3 cells in Morton order, one bit per cell.
struct GridSpec {
  const uint8_t* bitfield;  // [C*G^3/8]
  int C;
  int G;
  float bound;
  bool blocks;  // skip empty 8^3 blocks (needs G % 8 == 0 and an 8-byte aligned bitfield)
};

// Lattice of sample positions along a ray (see the twin's module docstring).
struct StepSpec {
  float dt_min;
  float dt_max;
  float dt_gamma;
  int max_steps;
};

// rays_o, rays_d: [N,3]; aabb: [6]; nears, fars: [N] (outputs).
cudaError_t near_far_from_aabb(const float* rays_o, const float* rays_d, const float* aabb,
                               int64_t N, float min_near, float* nears, float* fars,
                               cudaStream_t stream);

// coords: [N,3] int32 (each < 1024); out: [N] int64.
cudaError_t morton3d(const int32_t* coords, int64_t N, int64_t* out, cudaStream_t stream);

// indices: [N] int64; out: [N,3] int64.
cudaError_t morton3d_invert(const int64_t* indices, int64_t N, int64_t* out, cudaStream_t stream);

// grid: [n_bytes*8] float; out: [n_bytes] uint8.
cudaError_t packbits(const float* grid, int64_t n_bytes, float thresh, uint8_t* out,
                     cudaStream_t stream);

// Pass 1 of march_rays_train: per-ray sample counts; each ray reserves its slice of the
// packed arrays with an atomic add on *counter (so ray order in the packed arrays is
// arbitrary). rays_o, rays_d: [N,3]; nears, fars: [N]; noise: [N] or null (start at near);
// rays: [N,2] int32 (offset, count) output; counter: [1] int32, zeroed by the caller, ends
// as the total count. capacity >= 0: the packed arrays hold that many rows, and a ray whose
// slice crosses the end keeps only the samples that fit (count clipped, possibly to 0);
// capacity < 0: no limit. warp: with dt_gamma == 0, a warp per ray testing 32 lattice points
// at a time instead of a thread walking each ray (same samples).
cudaError_t march_rays_train_count(const float* rays_o, const float* rays_d, const float* nears,
                                   const float* fars, const float* noise, GridSpec grid,
                                   StepSpec step, int64_t N, int32_t* rays, int32_t* counter,
                                   int64_t capacity, bool warp, cudaStream_t stream);

// Pass 2: the same walk, writing xyzs, dirs: [M,3] and ts: [M,2] at each ray's offset.
cudaError_t march_rays_train_write(const float* rays_o, const float* rays_d, const float* nears,
                                   const float* fars, const float* noise, GridSpec grid,
                                   StepSpec step, int64_t N, const int32_t* rays, float* xyzs,
                                   float* dirs, float* ts, bool warp, cudaStream_t stream);

// sigmas: [M]; rgbs: [M,Cc]; ts: [M,2]; rays: [N,2] int32. Outputs (zeroed by the caller):
// weights [M], weights_sum [N], depth [N], image [N,Cc]. scalar_t is float or double.
template <typename scalar_t>
cudaError_t composite_train_forward(const scalar_t* sigmas, const scalar_t* rgbs,
                                    const scalar_t* ts, const int32_t* rays, int64_t N, int Cc,
                                    float T_thresh, scalar_t* weights, scalar_t* weights_sum,
                                    scalar_t* depth, scalar_t* image, cudaStream_t stream);

// Gradients of the forward's outputs in (grad_weights [M], grad_weights_sum [N],
// grad_depth [N], grad_image [N,Cc]); out: grad_sigmas [M], grad_rgbs [M,Cc] (zeroed).
template <typename scalar_t>
cudaError_t composite_train_backward(const scalar_t* grad_weights,
                                     const scalar_t* grad_weights_sum,
                                     const scalar_t* grad_depth, const scalar_t* grad_image,
                                     const scalar_t* sigmas, const scalar_t* rgbs,
                                     const scalar_t* ts, const int32_t* rays, int64_t N, int Cc,
                                     float T_thresh, scalar_t* grad_sigmas, scalar_t* grad_rgbs,
                                     cudaStream_t stream);

// Inference marching. rays_alive: [n_alive] (entries < 0 are skipped); rays_t: [N] updated
// in place; rays_o, rays_d: [N,3]; fars: [N]. Outputs [n_alive*n_step, 3|3|2]: xyzs and ts
// zeroed by the caller; dirs written for every slot.
template <typename index_t>
cudaError_t march_rays(int64_t n_alive, int n_step, const index_t* rays_alive, float* rays_t,
                       const float* rays_o, const float* rays_d, const float* fars,
                       GridSpec grid, StepSpec step, float* xyzs, float* dirs, float* ts,
                       cudaStream_t stream);

// Inference compositing, in place. sigmas: [n_alive*n_step]; rgbs: [n_alive*n_step, Cc];
// ts: [n_alive*n_step, 2]; weights_sum, depth: [N]; image: [N,Cc]; fars, rays_t: [N].
template <typename index_t>
cudaError_t composite_rays(int64_t n_alive, int n_step, index_t* rays_alive,
                           const float* rays_t, const float* sigmas, const float* rgbs,
                           const float* ts, int Cc, float* weights_sum, float* depth,
                           float* image, const float* fars, float T_thresh,
                           cudaStream_t stream);

// prune_rays_train, pass 1 (one thread per ray): mask[i] = 1 for each sample i of the ray
// whose optical depth before it (a running sum of sigma*dt in double, as the twin's) is at
// most max_depth; counts[r] = the ray's kept samples. sigmas: [M]; ts: [M,2]; rays: [N,2];
// mask: [M] int32 zeroed by the caller (samples of no ray stay 0); counts: [N] int32.
cudaError_t prune_rays_mark(const float* sigmas, const float* ts, const int32_t* rays, int64_t N,
                            double max_depth, int32_t* mask, int32_t* counts,
                            cudaStream_t stream);

// Pass 2, given csum = inclusive cumsum of mask [M]: keep[csum[i]-1] = i for kept samples
// (keep: [M'] int64, in sample order) and new_rays[r] = (kept samples before the ray's first,
// counts[r]) (0 offset for empty rays), as the twin packs them. capacity >= 0: keep holds
// that many entries (zeroed by the caller); kept samples past it are dropped and their rays'
// counts clipped; capacity < 0: keep holds every kept sample.
cudaError_t prune_rays_write(const int32_t* rays, const int32_t* mask, const int32_t* csum,
                             const int32_t* counts, int64_t M, int64_t N, int64_t* keep,
                             int32_t* new_rays, int64_t capacity, cudaStream_t stream);

}  // namespace dfk
