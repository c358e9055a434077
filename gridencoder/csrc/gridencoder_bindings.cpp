// Tensor glue of the grid-encoder kernels: checks, allocation, stream; see gridencoder.h.
// Python (gridencoder/_cuda.py) picks supported dtypes and makes tensors contiguous.
// Only what is used (not <torch/extension.h>, which doubles the compile time): tensors,
// their factory functions, the dtype dispatch, and pybind11 casters for tensors.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <vector>

#include "gridencoder.h"

namespace {

#define DFK_CHECK_INPUT(x)                                        \
  TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor");        \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")

dfk::EmbType emb_type(const at::Tensor& embeddings, const at::Tensor& inputs) {
  const auto et = embeddings.scalar_type(), it = inputs.scalar_type();
  if (et == at::kDouble) {
    TORCH_CHECK(it == at::kDouble, "float64 embeddings need float64 inputs");
    return dfk::EmbType::kFloat64;
  }
  TORCH_CHECK(it == at::kFloat, "inputs must be float32 (float64 with float64 embeddings)");
  if (et == at::kFloat) return dfk::EmbType::kFloat32;
  if (et == at::kHalf) return dfk::EmbType::kFloat16;
  TORCH_CHECK(et == at::kBFloat16, "embeddings must be float32, float16, bfloat16 or float64");
  return dfk::EmbType::kBFloat16;
}

// A feature/gradient tensor's type: the table's, or half/bfloat16 for a float32 table.
dfk::EmbType feature_type(at::ScalarType t, dfk::EmbType table) {
  switch (t) {
    case at::kFloat:
      return dfk::EmbType::kFloat32;
    case at::kHalf:
      return dfk::EmbType::kFloat16;
    case at::kBFloat16:
      return dfk::EmbType::kBFloat16;
    case at::kDouble:
      return dfk::EmbType::kFloat64;
    default:
      TORCH_CHECK(false, "unsupported feature dtype ", t);
  }
  return table;
}

dfk::GridLayout layout(const at::Tensor& offsets, const at::Tensor& points,
                       const at::Tensor& scales, const at::Tensor& inputs,
                       const at::Tensor& embeddings, bool align_corners, bool smoothstep,
                       int64_t max_level, int64_t agg_mode, int64_t agg_max_points, bool soa) {
  DFK_CHECK_INPUT(offsets);
  DFK_CHECK_INPUT(points);
  DFK_CHECK_INPUT(scales);
  TORCH_CHECK(offsets.scalar_type() == at::kInt && points.scalar_type() == at::kInt,
              "offsets and points must be int32");
  TORCH_CHECK(scales.scalar_type() == inputs.scalar_type(), "scales must have the inputs' type");
  const int64_t L = points.numel();
  TORCH_CHECK(offsets.numel() == L + 1 && scales.numel() == L, "inconsistent level layout");
  TORCH_CHECK(agg_mode == 0 || agg_mode == 1, "agg_mode must be 0 or 1");
  dfk::GridLayout lay{};
  lay.offsets = offsets.data_ptr<int32_t>();
  lay.points = points.data_ptr<int32_t>();
  lay.scales = scales.data_ptr();
  lay.L = static_cast<int>(L);
  lay.F = static_cast<int>(embeddings.size(1));
  lay.max_level = static_cast<int>(std::min<int64_t>(max_level, L));
  lay.align_corners = align_corners;
  lay.smoothstep = smoothstep;
  lay.agg_mode = static_cast<int>(agg_mode);
  lay.agg_max_points = static_cast<int>(agg_max_points);
  lay.soa = soa;
  return lay;
}

// live: [1] int32 on the inputs' device, or none; see GridLayout::live.
void set_live(dfk::GridLayout& lay, const std::optional<at::Tensor>& live, int64_t live_period,
              const at::Tensor& inputs) {
  if (!live.has_value()) return;
  DFK_CHECK_INPUT(*live);
  TORCH_CHECK(live->scalar_type() == at::kInt && live->numel() == 1, "live must be one int32");
  TORCH_CHECK(live->device() == inputs.device(), "live must be on the inputs' device");
  TORCH_CHECK(live_period > 0, "live_period must be positive");
  lay.live = live->data_ptr<int32_t>();
  lay.live_period = live_period;
}

at::Tensor grid_encode_forward(const at::Tensor& inputs, const at::Tensor& embeddings,
                               const at::Tensor& offsets, const at::Tensor& points,
                               const at::Tensor& scales, bool align_corners, bool smoothstep,
                               int64_t max_level, bool soa, at::ScalarType out_dtype,
                               const std::optional<at::Tensor>& live, int64_t live_period) {
  DFK_CHECK_INPUT(inputs);
  DFK_CHECK_INPUT(embeddings);
  const c10::cuda::CUDAGuard guard(inputs.device());
  auto lay = layout(offsets, points, scales, inputs, embeddings, align_corners, smoothstep,
                    max_level, 0, 0, soa);
  set_live(lay, live, live_period, inputs);
  const auto et = emb_type(embeddings, inputs);
  const auto ot = feature_type(out_dtype, et);
  TORCH_CHECK(ot == et || et == dfk::EmbType::kFloat32,
              "features in another dtype than the table's need a float32 table");
  const int64_t N = inputs.size(0);
  const auto opts = embeddings.options().dtype(out_dtype);
  auto out = soa ? at::empty({lay.L * lay.F, N}, opts) : at::empty({N, lay.L * lay.F}, opts);
  const auto err = dfk::grid_encode_forward(inputs.data_ptr(), embeddings.data_ptr(), et, N,
                                            static_cast<int>(inputs.size(1)), lay, ot,
                                            out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "grid_encode forward failed: ", cudaGetErrorString(err));
  return out;
}

// grad_out: [N, L*F], or [L*F, N] with soa. Returns (grad_embeddings or an empty tensor,
// grad_inputs or an empty tensor). Embedding gradients accumulate in float32 (float64 for
// float64 tables) and are cast back.
std::vector<at::Tensor> grid_encode_backward(const at::Tensor& grad_out,
                                             const at::Tensor& inputs,
                                             const at::Tensor& embeddings,
                                             const at::Tensor& offsets, const at::Tensor& points,
                                             const at::Tensor& scales, bool align_corners,
                                             bool smoothstep, int64_t max_level, bool need_emb,
                                             bool need_inputs, int64_t agg_mode,
                                             int64_t agg_max_points, bool soa,
                                             const std::optional<at::Tensor>& live,
                                             int64_t live_period) {
  DFK_CHECK_INPUT(grad_out);
  DFK_CHECK_INPUT(inputs);
  DFK_CHECK_INPUT(embeddings);
  const c10::cuda::CUDAGuard guard(inputs.device());
  auto lay = layout(offsets, points, scales, inputs, embeddings, align_corners, smoothstep,
                    max_level, agg_mode, agg_max_points, soa);
  set_live(lay, live, live_period, inputs);
  const auto et = emb_type(embeddings, inputs);
  const auto gt = feature_type(grad_out.scalar_type(), et);
  TORCH_CHECK(gt == et || et == dfk::EmbType::kFloat32,
              "grad_out in another dtype than the table's needs a float32 table");
  const auto acc = et == dfk::EmbType::kFloat64 ? at::kDouble : at::kFloat;
  at::Tensor grad_emb, grad_in;
  if (need_emb) grad_emb = at::zeros(embeddings.sizes(), embeddings.options().dtype(acc));
  if (need_inputs) grad_in = at::zeros_like(inputs);
  const auto err = dfk::grid_encode_backward(
      grad_out.data_ptr(), gt, inputs.data_ptr(), embeddings.data_ptr(), et, inputs.size(0),
      static_cast<int>(inputs.size(1)), lay, need_emb ? grad_emb.data_ptr() : nullptr,
      need_inputs ? grad_in.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "grid_encode backward failed: ", cudaGetErrorString(err));
  if (need_emb && grad_emb.scalar_type() != embeddings.scalar_type()) {
    grad_emb = grad_emb.to(embeddings.scalar_type());
  }
  return {need_emb ? grad_emb : at::Tensor(), need_inputs ? grad_in : at::Tensor()};
}

}  // namespace

void register_gridencoder(pybind11::module_& m) {
  m.def("grid_encode_forward", &grid_encode_forward);
  m.def("grid_encode_backward", &grid_encode_backward);
}
