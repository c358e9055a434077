// Multi-resolution hash-grid encoding: launchers on raw device pointers.
//
// Semantics are those of gridencoder/_torch_impl.py; the .cu file includes no torch header
// so that it compiles quickly. Shapes are given on every argument.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dfk {

enum class EmbType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Per-level layout (device arrays): offsets [L+1] int32 (table rows of level l start at
// offsets[l]), points [L] int32 (lattice points per axis), scales [L] (the position scale:
// s_l, or ceil(s_l) with align_corners) in the input type.
struct GridLayout {
  const int32_t* offsets;
  const int32_t* points;
  const void* scales;
  int L;
  int F;          // features per level, at most 8
  int max_level;  // levels >= this output zeros
  bool align_corners;
  bool smoothstep;
  // Backward only: 1 merges the embedding-gradient atomics of runs of consecutive lanes on
  // the same table row inside the warp first (a segmented shuffle scan; samples of one ray
  // are consecutive, so coarse levels form runs), for levels with at most agg_max_points
  // lattice points per axis; 0 issues every atomic.
  int agg_mode;
  int agg_max_points;
  // Features laid out [L*F, N] (feature-major: a warp's stores coalesce) instead of [N, L*F].
  bool soa;
  // Set by the launchers (callers need not): F == 2 and the table aligned to a pair of
  // features, so a row loads as one vector.
  bool vec2;
  // Rows to compute (fixed-size CUDA graph replays, whose rows past the samples are padding):
  // row n is live when n % live_period < *live; other rows write zero features and pass no
  // gradient. null: every row.
  const int32_t* live;
  int64_t live_period;
};

// inputs: [N,D] in [0,1] (double when emb is kFloat64, else float); embeddings: [T,F];
// out: [N, L*F] (or [L*F, N] with layout.soa) of out_type: the embeddings' type, or for a
// kFloat32 table also kFloat16/kBFloat16 (accumulated in float, rounded once). D is 2 or 3.
cudaError_t grid_encode_forward(const void* inputs, const void* embeddings, EmbType emb,
                                int64_t N, int D, GridLayout layout, EmbType out_type, void* out,
                                cudaStream_t stream);

// grad_out: [N, L*F] (or [L*F, N] with layout.soa) of grad_type (as out_type above).
// grad_embeddings: [T,F] (float, or double for kFloat64; zeroed by the caller; null to skip);
// grad_inputs: [N,D] in the input type (zeroed; null to skip).
cudaError_t grid_encode_backward(const void* grad_out, EmbType grad_type, const void* inputs,
                                 const void* embeddings, EmbType emb, int64_t N, int D,
                                 GridLayout layout, void* grad_embeddings, void* grad_inputs,
                                 cudaStream_t stream);

}  // namespace dfk
