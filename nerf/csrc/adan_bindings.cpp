// Tensor glue of the fused Adan kernel (adan.h): checks and the stream.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>

#include "adan.h"

namespace {

void check_f32(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == at::kFloat, name,
              " must be a contiguous float32 CUDA tensor");
  TORCH_CHECK(t.numel() == like.numel() && t.device() == like.device(), name,
              " must match the parameter");
}

void adan_step(at::Tensor p, const at::Tensor& g, at::Tensor m, at::Tensor v, at::Tensor n,
               at::Tensor prev, const std::optional<at::Tensor>& clip, const at::Tensor& ok,
               const at::Tensor& step, double b1, double b2, double b3, double lr, double eps,
               double weight_decay) {
  check_f32(p, p, "p");
  check_f32(g, p, "grad");
  check_f32(m, p, "m");
  check_f32(v, p, "v");
  check_f32(n, p, "n");
  check_f32(prev, p, "prev");
  TORCH_CHECK(ok.is_cuda() && ok.numel() == 1 && ok.scalar_type() == at::kBool,
              "ok must be a one-element bool CUDA tensor");
  TORCH_CHECK(step.is_cuda() && step.numel() == 1 && step.scalar_type() == at::kFloat,
              "step must be a one-element float32 CUDA tensor");
  const float* clip_ptr = nullptr;
  if (clip.has_value()) {
    TORCH_CHECK(clip->is_cuda() && clip->numel() == 1 && clip->scalar_type() == at::kFloat,
                "clip must be a one-element float32 CUDA tensor");
    clip_ptr = clip->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(p.device());
  // Each hyper-parameter rounded once from double, as the foreach path's Python scalars are.
  const dfk::AdanHyper h{static_cast<float>(b1),      static_cast<float>(b2),
                         static_cast<float>(b3),      static_cast<float>(1.0 - b1),
                         static_cast<float>(1.0 - b2), static_cast<float>(1.0 - b3),
                         static_cast<float>(lr),      static_cast<float>(lr * weight_decay),
                         static_cast<float>(eps)};
  const cudaError_t err = dfk::adan_step(
      p.data_ptr<float>(), g.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(),
      n.data_ptr<float>(), prev.data_ptr<float>(), p.numel(), clip_ptr, ok.data_ptr<bool>(),
      step.data_ptr<float>(), h, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "adan_step failed: ", cudaGetErrorString(err));
}

}  // namespace

void register_adan(pybind11::module_& m) { m.def("adan_step", &adan_step); }
