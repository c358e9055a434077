// Tensor glue of the GroupNorm (+ SiLU) kernels (groupnorm.h): checks, outputs and the stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <vector>

#include "groupnorm.h"

namespace {

dfk::GnType gn_type(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return dfk::GnType::kFloat32;
    case at::kHalf:
      return dfk::GnType::kFloat16;
    case at::kBFloat16:
      return dfk::GnType::kBFloat16;
    default:
      TORCH_CHECK(false, "group_norm: x must be float32, float16 or bfloat16");
  }
}

void check_nhwc(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              " must be a channels_last [N,C,H,W] CUDA tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must be 16-byte aligned");
}

void check_vec(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == at::kFloat && t.numel() == n,
              name, " must be a contiguous float32 CUDA tensor of ", n, " elements");
}

dfk::GnShape shape_of(const at::Tensor& x, int64_t groups, double eps, bool silu, int64_t unroll) {
  return dfk::GnShape{x.size(0), x.size(2) * x.size(3), static_cast<int>(x.size(1)),
                      static_cast<int>(groups), static_cast<float>(eps), silu,
                      static_cast<int>(unroll)};
}

std::vector<at::Tensor> group_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& bias, int64_t groups, double eps,
                                           bool silu, int64_t unroll) {
  check_nhwc(x, "x");
  check_vec(weight, x.size(1), "weight");
  check_vec(bias, x.size(1), "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto s = shape_of(x, groups, eps, silu, unroll);
  const auto type = gn_type(x);
  auto y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  const auto f32 = x.options().dtype(at::kFloat);
  auto mean = at::empty({x.size(0), groups}, f32);
  auto rstd = at::empty({x.size(0), groups}, f32);
  auto work = at::empty({dfk::gn_work_floats(s, type)}, f32);
  const auto err = dfk::gn_forward(x.data_ptr(), weight.data_ptr<float>(), bias.data_ptr<float>(),
                                   type, s, y.data_ptr(), mean.data_ptr<float>(),
                                   rstd.data_ptr<float>(), work.data_ptr<float>(),
                                   c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "group_norm forward failed: ", cudaGetErrorString(err));
  return {y, mean, rstd};
}

at::Tensor group_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& mean,
                               const at::Tensor& rstd, int64_t groups, double eps, bool silu,
                               int64_t unroll) {
  check_nhwc(x, "x");
  check_nhwc(dy, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "dy must match x in shape and dtype");
  check_vec(weight, x.size(1), "weight");
  check_vec(bias, x.size(1), "bias");
  check_vec(mean, x.size(0) * groups, "mean");
  check_vec(rstd, x.size(0) * groups, "rstd");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto s = shape_of(x, groups, eps, silu, unroll);
  const auto type = gn_type(x);
  auto dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto work = at::empty({dfk::gn_work_floats(s, type)}, x.options().dtype(at::kFloat));
  const auto err = dfk::gn_backward(dy.data_ptr(), x.data_ptr(), weight.data_ptr<float>(),
                                    bias.data_ptr<float>(), mean.data_ptr<float>(),
                                    rstd.data_ptr<float>(), type, s, dx.data_ptr(),
                                    work.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "group_norm backward failed: ", cudaGetErrorString(err));
  return dx;
}

}  // namespace

void register_groupnorm(pybind11::module_& m) {
  m.def("group_norm_forward", &group_norm_forward);
  m.def("group_norm_backward", &group_norm_backward);
}
