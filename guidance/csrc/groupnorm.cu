// GroupNorm (+ SiLU) on channels_last activations: see groupnorm.h and guidance/groupnorm.py.
//
// The VAE encoder normalises a few large maps (512x512x128 at the top) over only 32 groups per
// image: a generic reduction gets 32 long rows and little parallelism (Inductor's kernels ran
// at a fifth of the memory bandwidth on the H100). Here every pass is spread over the pixels:
// a block reduces a slab of pixels for all groups (one 16-byte vector of channels per thread),
// writes its partial sums, and a small kernel combines them per group in double. Forward:
// statistics, then the normalisation (+ SiLU). Backward to the input: one pass for the two
// per-group sums of the gradient, one for dx; both recompute the normalised input from x.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "groupnorm.h"

namespace dfk {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerImage = 512;
constexpr int kMaxGroups = 128;

__device__ inline float ld(float v) { return v; }
__device__ inline float ld(__half v) { return __half2float(v); }
__device__ inline float ld(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ inline T st(float v);
template <>
__device__ inline float st<float>(float v) { return v; }
template <>
__device__ inline __half st<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ inline __nv_bfloat16 st<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements of T per 16-byte vector (the unit every kernel loads and stores).
template <typename T>
__host__ __device__ constexpr int vec_n() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T>
struct alignas(16) Vec {
  T v[vec_n<T>()];
};

__device__ inline float sigmoid(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

// d silu(y) / dy. The extension is built with --fmad=false (the ray marcher must round like
// its twin): the arithmetic here asks for fused multiply-adds explicitly.
__device__ inline float dsilu(float y) {
  const float sg = sigmoid(y);
  return sg * __fmaf_rn(y, 1.0f - sg, 1.0f);
}

// Backward terms of one element: the normalised input xh = x * rs + nmr (nmr = -mean * rstd)
// and dxh = dL/dxh, from the output gradient g through the SiLU (when on) and the weight.
__device__ inline void bwd_terms(float x, float g, float rs, float nmr, float w, float b, bool silu,
                                 float& xh, float& dxh) {
  xh = __fmaf_rn(x, rs, nmr);
  if (silu) g *= dsilu(__fmaf_rn(xh, w, b));
  dxh = g * w;
}

// Pixels per block iteration and blocks per image for a shape.
struct Tiling {
  int tpp;  // threads per pixel (C / VEC)
  int ppi;  // pixels per block iteration
  int blocks;
};

inline Tiling tiling(const GnShape& s, int vec) {
  Tiling t;
  t.tpp = s.C / vec;
  t.ppi = kThreads / t.tpp;
  const int64_t iters = (s.P + t.ppi - 1) / t.ppi;
  int64_t b = (iters + 7) / 8;  // at least 8 iterations per block
  if (b > kMaxBlocksPerImage) b = kMaxBlocksPerImage;
  if (b < 1) b = 1;
  t.blocks = static_cast<int>(b);
  return t;
}

// The pixels [block_begin, block_end) of this block (blockIdx.x), a multiple of t.ppi each.
__device__ inline int64_t block_pixels(const GnShape& s, const Tiling& t) {
  return ((s.P + t.blocks - 1) / t.blocks + t.ppi - 1) / t.ppi * t.ppi;
}
__device__ inline int64_t block_begin(const GnShape& s, const Tiling& t) {
  return blockIdx.x * block_pixels(s, t);
}
__device__ inline int64_t block_end(const GnShape& s, const Tiling& t) {
  const int64_t end = block_begin(s, t) + block_pixels(s, t);
  return end < s.P ? end : s.P;
}

// The vectors of channels [c0, c0 + V) of pixels p0, p0 + ppi, ... (U of them, those before
// p_end) of image n: x, and dy when BWD. All loads are issued before any is used.
template <typename T, bool BWD, int U>
__device__ __forceinline__ void load_pixels(const T* __restrict__ x, const T* __restrict__ dy,
                                            const GnShape& s, const Tiling& t, int n, int c0,
                                            int64_t p0, int64_t p_end, Vec<T> (&xv)[U],
                                            Vec<T> (&gv)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t p = p0 + u * t.ppi;
    if (p >= p_end) break;
    const int64_t off = (n * s.P + p) * s.C + c0;
    xv[u] = *reinterpret_cast<const Vec<T>*>(x + off);
    if (BWD) gv[u] = *reinterpret_cast<const Vec<T>*>(dy + off);
  }
}

// Per-block partial sums of two per-group quantities. Forward (BWD false): x and x^2. Backward
// (BWD true): dxh and dxh * xh, where xh is the normalised input and dxh = dL/dxh.
// part: [N, blocks, G, 2].
// U: pixels per thread per loop iteration, their loads issued together (more bytes in flight
// per thread: one 16-byte load at a time left the backward pass at a third of the bandwidth).
template <typename T, bool BWD, int U>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ weight,
                  const float* __restrict__ bias, const float* __restrict__ mean,
                  const float* __restrict__ rstd, GnShape s, Tiling t, float* __restrict__ part) {
  constexpr int V = vec_n<T>();
  __shared__ float sh[kMaxGroups][2];
  const int n = blockIdx.y;
  const int cpg = s.C / s.G;
  for (int i = threadIdx.x; i < s.G; i += blockDim.x) sh[i][0] = sh[i][1] = 0.0f;
  __syncthreads();
  // Every thread has a vector of channels: shape_ok requires C / V to divide the block.
  const int c0 = (threadIdx.x % t.tpp) * V;
  float w[V], b[V], rs[V], nmr[V];  // xh = x * rs + nmr (nmr = -mean * rstd)
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int g = (c0 + j) / cpg;
    w[j] = BWD ? weight[c0 + j] : 0.0f;
    b[j] = BWD ? bias[c0 + j] : 0.0f;
    rs[j] = BWD ? rstd[n * s.G + g] : 0.0f;
    nmr[j] = BWD ? -mean[n * s.G + g] * rs[j] : 0.0f;
  }
  float a0[V], a1[V];
#pragma unroll
  for (int j = 0; j < V; ++j) a0[j] = a1[j] = 0.0f;
  const int64_t p_end = block_end(s, t);
  for (int64_t p0 = block_begin(s, t) + threadIdx.x / t.tpp; p0 < p_end; p0 += U * t.ppi) {
    Vec<T> xv[U], gv[U];
    load_pixels<T, BWD, U>(x, dy, s, t, n, c0, p0, p_end, xv, gv);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (p0 + u * t.ppi >= p_end) break;
      if (!BWD) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float v = ld(xv[u].v[j]);
          a0[j] += v;
          a1[j] = __fmaf_rn(v, v, a1[j]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          float xh, dxh;
          bwd_terms(ld(xv[u].v[j]), ld(gv[u].v[j]), rs[j], nmr[j], w[j], b[j], s.silu, xh, dxh);
          a0[j] += dxh;
          a1[j] = __fmaf_rn(dxh, xh, a1[j]);
        }
      }
    }
  }
  // Channels of one group in this thread's vector are summed first, then added to the
  // block's per-group sums in shared memory.
  float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    s0 += a0[j];
    s1 += a1[j];
    const bool last = j == V - 1 || (c0 + j + 1) / cpg != (c0 + j) / cpg;
    if (last) {
      const int g = (c0 + j) / cpg;
      atomicAdd(&sh[g][0], s0);
      atomicAdd(&sh[g][1], s1);
      s0 = s1 = 0.0f;
    }
  }
  __syncthreads();
  float* out = part + (static_cast<int64_t>(n) * t.blocks + blockIdx.x) * s.G * 2;
  for (int i = threadIdx.x; i < s.G; i += blockDim.x) {
    out[2 * i] = sh[i][0];
    out[2 * i + 1] = sh[i][1];
  }
}

// Combines the blocks' partial sums per (image, group), in double: one block of kFinal threads
// per (image, group). Forward: mean and rstd. Backward: the per-group means of dxh and
// dxh * xh, into r0 and r1.
constexpr int kFinal = 128;

template <bool BWD>
__global__ void __launch_bounds__(kFinal)
    finalize_kernel(const float* __restrict__ part, GnShape s, int blocks, float* __restrict__ r0,
                    float* __restrict__ r1) {
  __shared__ double sh[2][kFinal / 32];
  const int i = blockIdx.x;  // n * G + g
  const int n = i / s.G, g = i % s.G;
  double a = 0.0, b = 0.0;
  for (int k = threadIdx.x; k < blocks; k += kFinal) {
    const float* q = part + ((static_cast<int64_t>(n) * blocks + k) * s.G + g) * 2;
    a += q[0];
    b += q[1];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  if ((threadIdx.x & 31) == 0) {
    sh[0][threadIdx.x / 32] = a;
    sh[1][threadIdx.x / 32] = b;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  a = b = 0.0;
#pragma unroll
  for (int w = 0; w < kFinal / 32; ++w) {
    a += sh[0][w];
    b += sh[1][w];
  }
  const double cnt = static_cast<double>(s.P) * (s.C / s.G);
  if (!BWD) {
    const double m = a / cnt;
    double var = b / cnt - m * m;
    if (var < 0.0) var = 0.0;
    r0[i] = static_cast<float>(m);
    r1[i] = static_cast<float>(1.0 / sqrt(var + static_cast<double>(s.eps)));
  } else {
    r0[i] = static_cast<float>(a / cnt);
    r1[i] = static_cast<float>(b / cnt);
  }
}

// Forward (BWD false): out = act(xh * w + b). Backward: out = rstd * (dxh - c1 - xh * c2).
// Tiled as reduce_kernel: a thread keeps one vector of channels, so its per-channel constants
// are computed once, and walks the block's pixels.
template <typename T, bool BWD, int U>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ weight,
                 const float* __restrict__ bias, const float* __restrict__ mean,
                 const float* __restrict__ rstd, const float* __restrict__ c1,
                 const float* __restrict__ c2, GnShape s, Tiling t, T* __restrict__ out) {
  constexpr int V = vec_n<T>();
  const int n = blockIdx.y;
  const int cpg = s.C / s.G;
  const int c0 = (threadIdx.x % t.tpp) * V;
  // Forward: y = x * k1 + k0. Backward: xh = x * rs + nmr, dx = dxh * rs + (xh * k2 + k0).
  float w[V], b[V], rs[V], nmr[V], k0[V], k1[V], k2[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int g = n * s.G + (c0 + j) / cpg;
    w[j] = weight[c0 + j];
    b[j] = bias[c0 + j];
    rs[j] = rstd[g];
    nmr[j] = -mean[g] * rs[j];
    if (!BWD) {
      k1[j] = rs[j] * w[j];
      k0[j] = __fmaf_rn(nmr[j], w[j], b[j]);
      k2[j] = 0.0f;
    } else {
      k1[j] = 0.0f;
      k0[j] = -rs[j] * c1[g];
      k2[j] = -rs[j] * c2[g];
    }
  }
  const int64_t p_end = block_end(s, t);
  for (int64_t p0 = block_begin(s, t) + threadIdx.x / t.tpp; p0 < p_end; p0 += U * t.ppi) {
    Vec<T> xv[U], gv[U];
    load_pixels<T, BWD, U>(x, dy, s, t, n, c0, p0, p_end, xv, gv);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t p = p0 + u * t.ppi;
      if (p >= p_end) break;
      Vec<T> o;
      if (!BWD) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float y = __fmaf_rn(ld(xv[u].v[j]), k1[j], k0[j]);
          o.v[j] = st<T>(s.silu ? y * sigmoid(y) : y);
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          float xh, dxh;
          bwd_terms(ld(xv[u].v[j]), ld(gv[u].v[j]), rs[j], nmr[j], w[j], b[j], s.silu, xh, dxh);
          o.v[j] = st<T>(__fmaf_rn(dxh, rs[j], __fmaf_rn(xh, k2[j], k0[j])));
        }
      }
      *reinterpret_cast<Vec<T>*>(out + (n * s.P + p) * s.C + c0) = o;
    }
  }
}

template <typename T, int U>
cudaError_t forward_unrolled(const T* x, const float* w, const float* b, GnShape s, T* y,
                             float* mean, float* rstd, float* work, cudaStream_t st) {
  const Tiling t = tiling(s, vec_n<T>());
  reduce_kernel<T, false, U><<<dim3(t.blocks, s.N), kThreads, 0, st>>>(x, nullptr, w, b, nullptr,
                                                                        nullptr, s, t, work);
  const int ng = static_cast<int>(s.N * s.G);
  finalize_kernel<false><<<ng, kFinal, 0, st>>>(work, s, t.blocks, mean, rstd);
  apply_kernel<T, false, U><<<dim3(t.blocks, s.N), kThreads, 0, st>>>(x, nullptr, w, b, mean, rstd,
                                                                       nullptr, nullptr, s, t, y);
  return cudaGetLastError();
}

template <typename T, int U>
cudaError_t backward_unrolled(const T* dy, const T* x, const float* w, const float* b,
                              const float* mean, const float* rstd, GnShape s, T* dx, float* work,
                              cudaStream_t st) {
  const Tiling t = tiling(s, vec_n<T>());
  reduce_kernel<T, true, U><<<dim3(t.blocks, s.N), kThreads, 0, st>>>(x, dy, w, b, mean, rstd, s,
                                                                       t, work);
  const int ng = static_cast<int>(s.N * s.G);
  float* c1 = work + s.N * static_cast<int64_t>(t.blocks) * s.G * 2;
  float* c2 = c1 + ng;
  finalize_kernel<true><<<ng, kFinal, 0, st>>>(work, s, t.blocks, c1, c2);
  apply_kernel<T, true, U><<<dim3(t.blocks, s.N), kThreads, 0, st>>>(x, dy, w, b, mean, rstd, c1,
                                                                      c2, s, t, dx);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_typed(const T* x, const float* w, const float* b, GnShape s, T* y, float* mean,
                          float* rstd, float* work, cudaStream_t st) {
  if (s.unroll >= 4) return forward_unrolled<T, 4>(x, w, b, s, y, mean, rstd, work, st);
  if (s.unroll == 2) return forward_unrolled<T, 2>(x, w, b, s, y, mean, rstd, work, st);
  return forward_unrolled<T, 1>(x, w, b, s, y, mean, rstd, work, st);
}

template <typename T>
cudaError_t backward_typed(const T* dy, const T* x, const float* w, const float* b,
                           const float* mean, const float* rstd, GnShape s, T* dx, float* work,
                           cudaStream_t st) {
  if (s.unroll >= 4) return backward_unrolled<T, 4>(dy, x, w, b, mean, rstd, s, dx, work, st);
  if (s.unroll == 2) return backward_unrolled<T, 2>(dy, x, w, b, mean, rstd, s, dx, work, st);
  return backward_unrolled<T, 1>(dy, x, w, b, mean, rstd, s, dx, work, st);
}

inline bool shape_ok(const GnShape& s, int vec) {
  return s.G >= 1 && s.G <= kMaxGroups && s.C % s.G == 0 && s.C % vec == 0 &&
         s.C / vec <= kThreads && kThreads % (s.C / vec) == 0 && s.N >= 1 && s.N <= 65535;
}

inline int vec_of(GnType type) {
  return type == GnType::kFloat32 ? vec_n<float>() : vec_n<__half>();  // bfloat16: as half
}

}  // namespace

int64_t gn_work_floats(GnShape shape, GnType type) {
  const Tiling t = tiling(shape, vec_of(type));
  return shape.N * static_cast<int64_t>(t.blocks) * shape.G * 2 + 2 * shape.N * shape.G;
}

cudaError_t gn_forward(const void* x, const float* weight, const float* bias, GnType type,
                       GnShape s, void* y, float* mean, float* rstd, float* work,
                       cudaStream_t stream) {
  if (!shape_ok(s, vec_of(type))) return cudaErrorInvalidValue;
  if (s.P == 0) return cudaSuccess;
  switch (type) {
    case GnType::kFloat32:
      return forward_typed(static_cast<const float*>(x), weight, bias, s, static_cast<float*>(y),
                           mean, rstd, work, stream);
    case GnType::kFloat16:
      return forward_typed(static_cast<const __half*>(x), weight, bias, s, static_cast<__half*>(y),
                           mean, rstd, work, stream);
    case GnType::kBFloat16:
      return forward_typed(static_cast<const __nv_bfloat16*>(x), weight, bias, s,
                           static_cast<__nv_bfloat16*>(y), mean, rstd, work, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t gn_backward(const void* dy, const void* x, const float* weight, const float* bias,
                        const float* mean, const float* rstd, GnType type, GnShape s, void* dx,
                        float* work, cudaStream_t stream) {
  if (!shape_ok(s, vec_of(type))) return cudaErrorInvalidValue;
  if (s.P == 0) return cudaSuccess;
  switch (type) {
    case GnType::kFloat32:
      return backward_typed(static_cast<const float*>(dy), static_cast<const float*>(x), weight,
                            bias, mean, rstd, s, static_cast<float*>(dx), work, stream);
    case GnType::kFloat16:
      return backward_typed(static_cast<const __half*>(dy), static_cast<const __half*>(x), weight,
                            bias, mean, rstd, s, static_cast<__half*>(dx), work, stream);
    case GnType::kBFloat16:
      return backward_typed(static_cast<const __nv_bfloat16*>(dy),
                            static_cast<const __nv_bfloat16*>(x), weight, bias, mean, rstd, s,
                            static_cast<__nv_bfloat16*>(dx), work, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dfk
