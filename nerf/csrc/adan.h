// Fused Adan update (see nerf/optimizer.py): one kernel per parameter tensor instead of
// about twenty multi-tensor passes. No torch header, so that it compiles quickly.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dfk {

// Hyper-parameters as float32, each rounded once from the double the optimizer holds, as the
// foreach path's scalars are: betas, the moment weights 1 - b, lr, lr * weight_decay, eps.
struct AdanHyper {
  float b1, b2, b3;
  float w1, w2, w3;
  float lr, lr_wd, eps;
};

// One gated Adan step of a float32 tensor of numel elements, in place: p (parameter), m, v, n
// (moments), prev (last clipped gradient); g the raw gradient. Device scalars: clip (gradient
// scale, or null for 1), ok (the step happens only where *ok is true: nothing changes
// otherwise), step (the step count including this step, as float; diff = 0 while it is 1).
// The arithmetic follows Adan._step_gated, operation for operation.
cudaError_t adan_step(float* p, const float* g, float* m, float* v, float* n, float* prev,
                      int64_t numel, const float* clip, const bool* ok, const float* step,
                      AdanHyper hyper, cudaStream_t stream);

}  // namespace dfk
