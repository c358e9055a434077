// Fused Adan update: see adan.h. One thread per element (a grid-stride loop past 4096 blocks);
// the step is memory-bound: 11 float arrays of numel read or written once.
#include <cuda_runtime.h>

#include <cstdint>

#include "adan.h"

namespace dfk {
namespace {

constexpr int kThreads = 256;

__global__ void adan_kernel(float* __restrict__ p, const float* __restrict__ g,
                            float* __restrict__ m, float* __restrict__ v, float* __restrict__ n,
                            float* __restrict__ prev, int64_t numel, const float* __restrict__ clip,
                            const bool* __restrict__ ok, const float* __restrict__ step,
                            AdanHyper h) {
  const float b1 = h.b1, b2 = h.b2, b3 = h.b3;
  if (!*ok) return;  // a skipped step changes nothing
  const float k = fmaxf(*step, 1.0f);
  const float c = clip != nullptr ? *clip : 1.0f;
  const float later = *step > 1.0f ? 1.0f : 0.0f;  // 0 at the first applied step: diff = 0
  // Bias corrections as the foreach path computes them: 1 - b^k in float.
  const float bc1 = 1.0f - powf(b1, k);
  const float bc2 = 1.0f - powf(b2, k);
  const float bc3 = 1.0f - powf(b3, k);
  const float vscale = b2 / bc2;
  const float decay = 1.0f + h.lr_wd;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += stride) {
    const float gi = g[i] * c;
    const float d = (gi - prev[i]) * later;
    float mi = m[i], vi = v[i], ni = n[i];
    mi = mi + (gi - mi) * h.w1;
    vi = vi + (d - vi) * h.w2;
    const float nest = gi + d * b2;
    ni = ni + (nest * nest - ni) * h.w3;
    m[i] = mi;
    v[i] = vi;
    n[i] = ni;
    prev[i] = gi;
    const float denom = sqrtf(ni / bc3) + h.eps;
    const float num = mi / bc1 + vi * vscale;
    const float pi = p[i] + (num / denom) * (-h.lr);
    p[i] = h.lr_wd != 0.0f ? pi / decay : pi;
  }
}

}  // namespace

cudaError_t adan_step(float* p, const float* g, float* m, float* v, float* n, float* prev,
                      int64_t numel, const float* clip, const bool* ok, const float* step,
                      AdanHyper hyper, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  int64_t blocks = (numel + kThreads - 1) / kThreads;
  if (blocks > 4096) blocks = 4096;  // grid-stride beyond: enough blocks to fill any GPU
  adan_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      p, g, m, v, n, prev, numel, clip, ok, step, hyper);
  return cudaGetLastError();
}

}  // namespace dfk
