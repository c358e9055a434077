// Hash-grid encoding kernels (see gridencoder.h and gridencoder/_torch_impl.py).
//
// One thread per (level, point); threads of a warp share the level and take consecutive
// points, so input reads coalesce and the level's parameters stay uniform. The position
// p = x * s + 0.5 decides the cell, so it is rounded exactly as the twin computes it (the
// extension is built with --fmad=false: no fused multiply-add).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "gridencoder.h"

namespace dfk {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxF = 8;
// Hash primes of the twin (PRIMES[:D]).
__constant__ uint32_t kPrimes[3] = {1u, 2654435761u, 805459861u};

__device__ inline float to_acc(float v) { return v; }
__device__ inline float to_acc(__half v) { return __half2float(v); }
__device__ inline float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline double to_acc(double v) { return v; }

template <typename T>
__device__ inline T from_acc(float v);
template <>
__device__ inline float from_acc<float>(float v) { return v; }
template <>
__device__ inline __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ inline __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T>
__device__ inline T from_acc(double v) { return v; }

// A point's cell in one level: lower corner, interpolation fractions (after smoothstep) and
// their derivatives d frac / d x (smoothstep' times the scale).
template <typename in_t, int D>
struct Located {
  int corner[D];
  in_t w[D];
  in_t dw[D];
};

template <typename in_t, int D>
__device__ inline Located<in_t, D> locate(const in_t* x, in_t scale, bool align, bool smooth) {
  Located<in_t, D> r;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    const in_t pos = align ? x[d] * scale : x[d] * scale + in_t(0.5);
    const in_t g = floor(pos);
    const in_t f = pos - g;
    r.corner[d] = static_cast<int>(g);
    if (smooth) {
      r.w[d] = f * f * (in_t(3) - in_t(2) * f);
      r.dw[d] = in_t(6) * f * (in_t(1) - f) * scale;
    } else {
      r.w[d] = f;
      r.dw[d] = scale;
    }
  }
  return r;
}

// How a level maps lattice points to table rows, fixed per level (warp-uniform): dense
// (x + y P + z P^2, when its P^D points fit the table) or hashed, then modulo the size.
struct RowMap {
  int P;
  uint32_t size;
  bool dense;
  bool pow2;  // size is a power of two: the modulo is a mask
  int64_t base;
};

template <int D>
__device__ inline RowMap row_map(int P, int64_t base, int64_t size) {
  int64_t dense_n = 1;
#pragma unroll
  for (int d = 0; d < D; ++d) dense_n *= P;
  const uint32_t s = static_cast<uint32_t>(size);  // level sizes are < 2^31 (int32 offsets)
  return RowMap{P, s, dense_n <= size, (s & (s - 1u)) == 0u, base};
}

// Table row of lattice point c (clamped to the level). 32-bit arithmetic throughout: a dense
// index is below P^D <= size < 2^31 and needs no modulo; the hash is uint32. (A 64-bit
// remainder is a long library routine, run 8 times per point and level.)
template <int D>
__device__ inline int64_t table_row(const int* c, const RowMap& m) {
  uint32_t idx = 0;
  if (m.dense) {
    uint32_t stride = 1;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      idx += static_cast<uint32_t>(c[d]) * stride;
      stride *= static_cast<uint32_t>(m.P);
    }
  } else {
#pragma unroll
    for (int d = 0; d < D; ++d) idx ^= static_cast<uint32_t>(c[d]) * kPrimes[d];
    idx = m.pow2 ? (idx & (m.size - 1u)) : (idx % m.size);
  }
  return static_cast<int64_t>(idx) + m.base;
}

// Features f < F of one table row, as acc_t. Two features (the default) in one vector load
// when the table allows it (vec2: F == 2 and the pointer aligned to the pair).
__device__ inline void load_pair(const float* p, float* v) {
  const float2 t = *reinterpret_cast<const float2*>(p);
  v[0] = t.x;
  v[1] = t.y;
}
__device__ inline void load_pair(const __half* p, float* v) {
  const float2 t = __half22float2(*reinterpret_cast<const __half2*>(p));
  v[0] = t.x;
  v[1] = t.y;
}
__device__ inline void load_pair(const __nv_bfloat16* p, float* v) {
  const float2 t = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  v[0] = t.x;
  v[1] = t.y;
}
__device__ inline void load_pair(const double* p, double* v) {
  v[0] = p[0];
  v[1] = p[1];
}

template <typename emb_t, typename acc_t>
__device__ inline void load_row(const emb_t* e, int F, bool vec2, acc_t* v) {
  if (vec2) {
    load_pair(e, v);
    return;
  }
#pragma unroll
  for (int f = 0; f < kMaxF; ++f) v[f] = f < F ? to_acc(e[f]) : acc_t(0);
}

template <int D>
__device__ inline void corner_point(const int* lower, int corner, int P, int* c) {
#pragma unroll
  for (int d = 0; d < D; ++d) c[d] = min(lower[d] + ((corner >> d) & 1), P - 1);
}

__device__ inline bool row_live(const GridLayout& lay, int64_t n) {
  return lay.live == nullptr || n % lay.live_period < *lay.live;
}

template <typename in_t, typename emb_t, typename out_t, int D>
__global__ void forward_kernel(const in_t* __restrict__ inputs, const emb_t* __restrict__ emb,
                               int64_t N, GridLayout lay, out_t* __restrict__ out) {
  using acc_t = decltype(to_acc(emb_t()));
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (tid >= N * lay.L) return;
  const int l = static_cast<int>(tid / N);
  const int64_t n = tid - l * N;
  const int F = lay.F;
  // Feature f of this (point, level) is o[f * os].
  const int64_t os = lay.soa ? N : 1;
  out_t* o = out + (lay.soa ? l * F * N + n : (n * lay.L + l) * F);
  if (l >= lay.max_level || !row_live(lay, n)) {
    for (int f = 0; f < F; ++f) o[f * os] = from_acc<out_t>(acc_t(0));
    return;
  }
  const in_t scale = static_cast<const in_t*>(lay.scales)[l];
  const int P = lay.points[l];
  const RowMap map = row_map<D>(P, lay.offsets[l], lay.offsets[l + 1] - lay.offsets[l]);
  const auto loc = locate<in_t, D>(inputs + n * D, scale, lay.align_corners, lay.smoothstep);
  acc_t acc[kMaxF];
#pragma unroll
  for (int f = 0; f < kMaxF; ++f) acc[f] = 0;
#pragma unroll
  for (int corner = 0; corner < (1 << D); ++corner) {
    int c[D];
    corner_point<D>(loc.corner, corner, P, c);
    in_t w = 1;
#pragma unroll
    for (int d = 0; d < D; ++d) w *= ((corner >> d) & 1) ? loc.w[d] : in_t(1) - loc.w[d];
    acc_t e[kMaxF];
    load_row(emb + table_row<D>(c, map) * F, F, lay.vec2, e);
#pragma unroll
    for (int f = 0; f < kMaxF; ++f) {
      if (f < F) acc[f] += static_cast<acc_t>(w) * e[f];
    }
  }
#pragma unroll
  for (int f = 0; f < kMaxF; ++f) {
    if (f < F) o[f * os] = from_acc<out_t>(acc[f]);
  }
}

// grad[row*F .. row*F+F) += v: with two fp32 features on Hopper one 8-byte vector atomic
// (sm_90 has float2 atomicAdd) instead of two.
template <typename acc_t>
__device__ inline void add_row(acc_t* dst, const acc_t* v, int F) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same_v<acc_t, float>) {
    if (F == 2) {
      atomicAdd(reinterpret_cast<float2*>(dst), make_float2(v[0], v[1]));
      return;
    }
  }
#endif
#pragma unroll
  for (int f = 0; f < kMaxF; ++f) {
    if (f < F) atomicAdd(dst + f, v[f]);
  }
}

// Sum of x over the lane's run (consecutive lanes with the same key), left in the run's first
// lane. All 32 lanes call it together. A segmented Hillis-Steele scan towards lower lanes:
// log2(32) shuffles and no per-lane loop.
template <typename T>
__device__ inline T run_sum(int end, T x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int s = 1; s < 32; s <<= 1) {
    const T t = __shfl_down_sync(0xffffffffu, x, s);
    if (lane + s <= end) x += t;
  }
  return x;
}

// Embedding gradients by atomicAdd (fp32, or fp64 for double tables) and input gradients
// sum_corners (dy . e_corner) d w_corner / d x, added atomically across levels. A warp holds
// 32 consecutive samples (mostly of one ray), so at coarse levels they share cells and their
// atomicAdds on the same rows would serialise: lay.agg_mode merges them inside the warp first.
template <typename in_t, typename emb_t, typename gout_t, int D>
__global__ void backward_kernel(const gout_t* __restrict__ grad_out,
                                const in_t* __restrict__ inputs, const emb_t* __restrict__ emb,
                                int64_t N, GridLayout lay,
                                decltype(to_acc(emb_t()))* __restrict__ grad_emb,
                                in_t* __restrict__ grad_in) {
  using acc_t = decltype(to_acc(emb_t()));
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int lane = threadIdx.x & 31;
  // No early return yet: every lane of the warp must reach the ballot below.
  const int l = tid < N * lay.L ? static_cast<int>(tid / N) : lay.L;
  // Zeroed levels and rows that are not live pass no gradient.
  const bool valid = l < lay.max_level && l < lay.L && row_live(lay, tid - l * N);
  const int P = valid ? lay.points[l] : 0;
  const bool agg = grad_emb != nullptr && lay.agg_mode != 0 && valid && P <= lay.agg_max_points;
  // Run merging shuffles over the full warp: then idle lanes stay, as empty runs (warp-uniform).
  const bool runs = __ballot_sync(0xffffffffu, agg) != 0u;
  if (!valid && !runs) return;
  const int lv = valid ? l : 0;
  const int64_t n = valid ? tid - l * N : 0;
  const int F = lay.F;
  const in_t scale = static_cast<const in_t*>(lay.scales)[lv];
  const RowMap map = row_map<D>(valid ? P : 1, lay.offsets[lv], lay.offsets[lv + 1] - lay.offsets[lv]);
  const auto loc = locate<in_t, D>(inputs + n * D, scale, lay.align_corners, lay.smoothstep);
  acc_t go[kMaxF];
  const int64_t gs = lay.soa ? N : 1;
  const gout_t* g = grad_out + (lay.soa ? lv * F * N + n : (n * lay.L + lv) * F);
#pragma unroll
  for (int f = 0; f < kMaxF; ++f) go[f] = (valid && f < F) ? to_acc(g[f * gs]) : acc_t(0);
  in_t gx[D];
#pragma unroll
  for (int d = 0; d < D; ++d) gx[d] = 0;
#pragma unroll
  for (int corner = 0; corner < (1 << D); ++corner) {
    int c[D];
    corner_point<D>(loc.corner, corner, valid ? P : 1, c);
    in_t f1[D];  // per-axis factor of this corner's weight
#pragma unroll
    for (int d = 0; d < D; ++d) f1[d] = ((corner >> d) & 1) ? loc.w[d] : in_t(1) - loc.w[d];
    const int64_t row = table_row<D>(c, map);
    if (grad_emb != nullptr) {
      in_t w = 1;
#pragma unroll
      for (int d = 0; d < D; ++d) w *= f1[d];
      acc_t v[kMaxF];
#pragma unroll
      for (int f = 0; f < kMaxF; ++f) v[f] = f < F ? static_cast<acc_t>(w) * go[f] : acc_t(0);
      bool leader = valid;
      if (runs) {
        // Rows are < 2^31 (checked on the host); idle lanes get keys no row has.
        const unsigned key = agg ? static_cast<unsigned>(row) : (0x80000000u | lane);
        const unsigned prev = __shfl_up_sync(0xffffffffu, key, 1);
        const bool head = lane == 0 || prev != key;
        const unsigned later = __ballot_sync(0xffffffffu, head) & ~((2u << lane) - 1u);
        const int end = later ? __ffs(later) - 2 : 31;  // last lane of this run
#pragma unroll
        for (int f = 0; f < kMaxF; ++f) {
          if (f < F) v[f] = run_sum(end, v[f]);
        }
        leader = valid && head;
      }
      // Samples past a ray's termination get exactly zero gradient: skip their atomics.
      bool nonzero = false;
#pragma unroll
      for (int f = 0; f < kMaxF; ++f) nonzero |= f < F && v[f] != acc_t(0);
      if (leader && nonzero) add_row(grad_emb + row * F, v, F);
    }
    if (grad_in != nullptr && valid) {
      acc_t e[kMaxF];
      load_row(emb + row * F, F, lay.vec2, e);
      acc_t ge = 0;  // dy . e_corner
#pragma unroll
      for (int f = 0; f < kMaxF; ++f) {
        if (f < F) ge += go[f] * e[f];
      }
#pragma unroll
      for (int d = 0; d < D; ++d) {
        in_t others = 1;
#pragma unroll
        for (int e = 0; e < D; ++e) {
          if (e != d) others *= f1[e];
        }
        const in_t sign = ((corner >> d) & 1) ? in_t(1) : in_t(-1);
        gx[d] += static_cast<in_t>(ge) * sign * others;
      }
    }
  }
  if (grad_in != nullptr && valid) {
#pragma unroll
    for (int d = 0; d < D; ++d) atomicAdd(grad_in + n * D + d, gx[d] * loc.dw[d]);
  }
}

// Rows of two features load as one vector when the table is aligned to the pair (row r
// starts at byte 2 r sizeof(emb_t)).
inline bool vec2_ok(const void* emb, int F, size_t elem) {
  return F == 2 && reinterpret_cast<uintptr_t>(emb) % (2 * elem) == 0;
}

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

// D is a template parameter of the kernels; out_t is the feature type (the table's, or a
// half type for a float32 table under autocast).
template <typename in_t, typename emb_t, typename out_t>
cudaError_t forward_launch(const void* inputs, const void* emb, int64_t N, int D, GridLayout lay,
                           void* out, cudaStream_t stream) {
  const auto* x = static_cast<const in_t*>(inputs);
  const auto* e = static_cast<const emb_t*>(emb);
  auto* o = static_cast<out_t*>(out);
  lay.vec2 = vec2_ok(emb, lay.F, sizeof(emb_t));
  const unsigned blocks = blocks_for(N * lay.L);
  if (D == 2) {
    forward_kernel<in_t, emb_t, out_t, 2><<<blocks, kThreads, 0, stream>>>(x, e, N, lay, o);
  } else if (D == 3) {
    forward_kernel<in_t, emb_t, out_t, 3><<<blocks, kThreads, 0, stream>>>(x, e, N, lay, o);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename in_t, typename emb_t, typename gout_t>
cudaError_t backward_launch(const void* grad_out, const void* inputs, const void* emb, int64_t N,
                            int D, GridLayout lay, void* grad_emb, void* grad_in,
                            cudaStream_t stream) {
  using acc_t = decltype(to_acc(emb_t()));
  const auto* go = static_cast<const gout_t*>(grad_out);
  const auto* x = static_cast<const in_t*>(inputs);
  const auto* e = static_cast<const emb_t*>(emb);
  auto* ge = static_cast<acc_t*>(grad_emb);
  auto* gi = static_cast<in_t*>(grad_in);
  lay.vec2 = vec2_ok(emb, lay.F, sizeof(emb_t));
  const unsigned blocks = blocks_for(N * lay.L);
  if (D == 2) {
    backward_kernel<in_t, emb_t, gout_t, 2><<<blocks, kThreads, 0, stream>>>(go, x, e, N, lay, ge, gi);
  } else if (D == 3) {
    backward_kernel<in_t, emb_t, gout_t, 3><<<blocks, kThreads, 0, stream>>>(go, x, e, N, lay, ge, gi);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Feature types: the table's own, and for a float32 table also float16 or bfloat16.
template <typename in_t, typename emb_t>
cudaError_t forward_typed(const void* inputs, const void* emb, int64_t N, int D, GridLayout lay,
                          EmbType out_type, EmbType emb_type, void* out, cudaStream_t stream) {
  if (out_type == emb_type) return forward_launch<in_t, emb_t, emb_t>(inputs, emb, N, D, lay, out, stream);
  if constexpr (std::is_same_v<emb_t, float>) {
    if (out_type == EmbType::kFloat16) {
      return forward_launch<in_t, emb_t, __half>(inputs, emb, N, D, lay, out, stream);
    }
    if (out_type == EmbType::kBFloat16) {
      return forward_launch<in_t, emb_t, __nv_bfloat16>(inputs, emb, N, D, lay, out, stream);
    }
  }
  return cudaErrorInvalidValue;
}

template <typename in_t, typename emb_t>
cudaError_t backward_typed(const void* grad_out, EmbType grad_type, EmbType emb_type,
                           const void* inputs, const void* emb, int64_t N, int D, GridLayout lay,
                           void* grad_emb, void* grad_in, cudaStream_t stream) {
  if (grad_type == emb_type) {
    return backward_launch<in_t, emb_t, emb_t>(grad_out, inputs, emb, N, D, lay, grad_emb, grad_in,
                                               stream);
  }
  if constexpr (std::is_same_v<emb_t, float>) {
    if (grad_type == EmbType::kFloat16) {
      return backward_launch<in_t, emb_t, __half>(grad_out, inputs, emb, N, D, lay, grad_emb,
                                                  grad_in, stream);
    }
    if (grad_type == EmbType::kBFloat16) {
      return backward_launch<in_t, emb_t, __nv_bfloat16>(grad_out, inputs, emb, N, D, lay,
                                                         grad_emb, grad_in, stream);
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t grid_encode_forward(const void* inputs, const void* embeddings, EmbType emb,
                                int64_t N, int D, GridLayout layout, EmbType out_type, void* out,
                                cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (layout.F < 1 || layout.F > kMaxF) return cudaErrorInvalidValue;
  switch (emb) {
    case EmbType::kFloat32:
      return forward_typed<float, float>(inputs, embeddings, N, D, layout, out_type, emb, out,
                                         stream);
    case EmbType::kFloat16:
      return forward_typed<float, __half>(inputs, embeddings, N, D, layout, out_type, emb, out,
                                          stream);
    case EmbType::kBFloat16:
      return forward_typed<float, __nv_bfloat16>(inputs, embeddings, N, D, layout, out_type, emb,
                                                 out, stream);
    case EmbType::kFloat64:
      return forward_typed<double, double>(inputs, embeddings, N, D, layout, out_type, emb, out,
                                           stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t grid_encode_backward(const void* grad_out, EmbType grad_type, const void* inputs,
                                 const void* embeddings, EmbType emb, int64_t N, int D,
                                 GridLayout layout, void* grad_embeddings, void* grad_inputs,
                                 cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (layout.F < 1 || layout.F > kMaxF) return cudaErrorInvalidValue;
  switch (emb) {
    case EmbType::kFloat32:
      return backward_typed<float, float>(grad_out, grad_type, emb, inputs, embeddings, N, D,
                                          layout, grad_embeddings, grad_inputs, stream);
    case EmbType::kFloat16:
      return backward_typed<float, __half>(grad_out, grad_type, emb, inputs, embeddings, N, D,
                                           layout, grad_embeddings, grad_inputs, stream);
    case EmbType::kBFloat16:
      return backward_typed<float, __nv_bfloat16>(grad_out, grad_type, emb, inputs, embeddings, N,
                                                  D, layout, grad_embeddings, grad_inputs, stream);
    case EmbType::kFloat64:
      return backward_typed<double, double>(grad_out, grad_type, emb, inputs, embeddings, N, D,
                                            layout, grad_embeddings, grad_inputs, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dfk
