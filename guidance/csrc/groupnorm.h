// GroupNorm (optionally followed by SiLU) on channels_last activations, forward and backward to
// the input, for the VAE encoder of the SDS step (guidance/groupnorm.py). No torch header, so
// that it compiles quickly.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dfk {

enum class GnType { kFloat32, kFloat16, kBFloat16 };

// x: [N, P, C] (channels_last: P = H*W pixels of C channels), G groups of C/G channels. C must
// be a multiple of the vector width (4 for float32, 8 for half types). weight, bias: [C] float32.
struct GnShape {
  int64_t N, P;
  int C, G;
  float eps;
  bool silu;
  int unroll;  // pixels per thread per loop iteration: 1, 2 or 4 (same results)
};

// y = act((x - mean) * rstd * weight + bias); writes mean, rstd [N, G] (float32) and y.
// work: float32 scratch of gn_work_floats(shape) elements.
cudaError_t gn_forward(const void* x, const float* weight, const float* bias, GnType type,
                       GnShape shape, void* y, float* mean, float* rstd, float* work,
                       cudaStream_t stream);

// dx from dy, x and the forward's mean and rstd (weight and bias get no gradient).
cudaError_t gn_backward(const void* dy, const void* x, const float* weight, const float* bias,
                        const float* mean, const float* rstd, GnType type, GnShape shape,
                        void* dx, float* work, cudaStream_t stream);

// Scratch floats the two functions need (per-block partial sums).
int64_t gn_work_floats(GnShape shape, GnType type);

}  // namespace dfk
