// Tensor glue of the ray-marching kernels: checks, allocation, stream; see raymarching.h.
// Python (raymarching/_cuda.py) converts dtypes and makes tensors contiguous beforehand.
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

#include <cmath>
#include <optional>
#include <vector>

#include "raymarching.h"

namespace {

#define DFK_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define DFK_CHECK_CONTIG(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define DFK_CHECK_DTYPE(x, t) TORCH_CHECK((x).scalar_type() == (t), #x " must be " #t)
#define DFK_CHECK(x, t) \
  DFK_CHECK_CUDA(x);    \
  DFK_CHECK_CONTIG(x);  \
  DFK_CHECK_DTYPE(x, t)

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

dfk::GridSpec grid_spec(const at::Tensor& bitfield, int64_t C, int64_t G, double bound) {
  DFK_CHECK(bitfield, at::kByte);
  TORCH_CHECK(bitfield.numel() * 8 == C * G * G * G, "bitfield must hold C*G^3 bits");
  TORCH_CHECK(G > 0 && G <= 1024, "grid size must be in [1, 1024]");
  const uint8_t* bits = bitfield.data_ptr<uint8_t>();
  const bool blocks = G % 8 == 0 && reinterpret_cast<uintptr_t>(bits) % 8 == 0;
  return {bits, static_cast<int>(C), static_cast<int>(G), static_cast<float>(bound), blocks};
}

dfk::StepSpec step_spec(double dt_min, double dt_max, double dt_gamma, int64_t max_steps) {
  return {static_cast<float>(dt_min), static_cast<float>(dt_max), static_cast<float>(dt_gamma),
          static_cast<int>(max_steps)};
}

std::vector<at::Tensor> near_far_from_aabb(const at::Tensor& rays_o, const at::Tensor& rays_d,
                                           const at::Tensor& aabb, double min_near) {
  DFK_CHECK(rays_o, at::kFloat);
  DFK_CHECK(rays_d, at::kFloat);
  DFK_CHECK(aabb, at::kFloat);
  const c10::cuda::CUDAGuard guard(rays_o.device());
  const int64_t N = rays_o.size(0);
  auto nears = at::empty({N}, rays_o.options());
  auto fars = at::empty({N}, rays_o.options());
  check_launch(dfk::near_far_from_aabb(rays_o.data_ptr<float>(), rays_d.data_ptr<float>(),
                                       aabb.data_ptr<float>(), N, static_cast<float>(min_near),
                                       nears.data_ptr<float>(), fars.data_ptr<float>(), stream()),
               "near_far_from_aabb");
  return {nears, fars};
}

at::Tensor morton3d(const at::Tensor& coords) {
  DFK_CHECK(coords, at::kInt);
  const c10::cuda::CUDAGuard guard(coords.device());
  const int64_t N = coords.size(0);
  auto out = at::empty({N}, coords.options().dtype(at::kLong));
  check_launch(dfk::morton3d(coords.data_ptr<int32_t>(), N, out.data_ptr<int64_t>(), stream()),
               "morton3D");
  return out;
}

at::Tensor morton3d_invert(const at::Tensor& indices) {
  DFK_CHECK(indices, at::kLong);
  const c10::cuda::CUDAGuard guard(indices.device());
  const int64_t N = indices.size(0);
  auto out = at::empty({N, 3}, indices.options());
  check_launch(dfk::morton3d_invert(indices.data_ptr<int64_t>(), N, out.data_ptr<int64_t>(),
                                    stream()),
               "morton3D_invert");
  return out;
}

at::Tensor packbits(const at::Tensor& grid, double thresh) {
  DFK_CHECK(grid, at::kFloat);
  TORCH_CHECK(grid.numel() % 8 == 0, "grid size must be a multiple of 8");
  const c10::cuda::CUDAGuard guard(grid.device());
  const int64_t n_bytes = grid.numel() / 8;
  auto out = at::empty({n_bytes}, grid.options().dtype(at::kByte));
  check_launch(dfk::packbits(grid.data_ptr<float>(), n_bytes, static_cast<float>(thresh),
                             out.data_ptr<uint8_t>(), stream()),
               "packbits");
  return out;
}

// Two passes: count (each ray reserving its slice with an atomic add), then write.
std::vector<at::Tensor> march_rays_train(const at::Tensor& rays_o, const at::Tensor& rays_d,
                                         const at::Tensor& nears, const at::Tensor& fars,
                                         const std::optional<at::Tensor>& noise,
                                         const at::Tensor& bitfield, double bound, int64_t C,
                                         int64_t G, double dt_gamma, int64_t max_steps,
                                         double dt_min, double dt_max, int64_t capacity,
                                         bool warp) {
  DFK_CHECK(rays_o, at::kFloat);
  DFK_CHECK(rays_d, at::kFloat);
  DFK_CHECK(nears, at::kFloat);
  DFK_CHECK(fars, at::kFloat);
  const float* noise_ptr = nullptr;
  if (noise.has_value()) {
    DFK_CHECK(*noise, at::kFloat);
    noise_ptr = noise->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(rays_o.device());
  const auto g = grid_spec(bitfield, C, G, bound);
  const auto s = step_spec(dt_min, dt_max, dt_gamma, max_steps);
  const int64_t N = rays_o.size(0);
  auto rays = at::empty({N, 2}, rays_o.options().dtype(at::kInt));
  auto counter = at::zeros({1}, rays_o.options().dtype(at::kInt));
  check_launch(dfk::march_rays_train_count(rays_o.data_ptr<float>(), rays_d.data_ptr<float>(),
                                           nears.data_ptr<float>(), fars.data_ptr<float>(),
                                           noise_ptr, g, s, N, rays.data_ptr<int32_t>(),
                                           counter.data_ptr<int32_t>(), capacity, warp, stream()),
               "march_rays_train (count)");
  // Without a capacity, the one host sync: the output size. With one (graph replays), rows
  // past the samples are zeros that belong to no ray, and counter says how many were needed.
  const int64_t M = capacity >= 0 ? capacity : counter.item<int32_t>();
  auto make = [&](int64_t k) {
    return capacity >= 0 ? at::zeros({M, k}, rays_o.options()) : at::empty({M, k}, rays_o.options());
  };
  auto xyzs = make(3), dirs = make(3), ts = make(2);
  check_launch(dfk::march_rays_train_write(rays_o.data_ptr<float>(), rays_d.data_ptr<float>(),
                                           nears.data_ptr<float>(), fars.data_ptr<float>(),
                                           noise_ptr, g, s, N, rays.data_ptr<int32_t>(),
                                           xyzs.data_ptr<float>(), dirs.data_ptr<float>(),
                                           ts.data_ptr<float>(), warp, stream()),
               "march_rays_train (write)");
  return {xyzs, dirs, ts, rays, counter};
}

std::vector<at::Tensor> composite_train_forward(const at::Tensor& sigmas, const at::Tensor& rgbs,
                                                const at::Tensor& ts, const at::Tensor& rays,
                                                double T_thresh) {
  const auto dt = sigmas.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "sigmas must be float32 or float64");
  DFK_CHECK(sigmas, dt);
  DFK_CHECK(rgbs, dt);
  DFK_CHECK(ts, dt);
  DFK_CHECK(rays, at::kInt);
  const c10::cuda::CUDAGuard guard(sigmas.device());
  const int64_t M = sigmas.size(0), N = rays.size(0), Cc = rgbs.size(1);
  auto weights = at::zeros({M}, sigmas.options());
  auto weights_sum = at::empty({N}, sigmas.options());
  auto depth = at::empty({N}, sigmas.options());
  auto image = at::zeros({N, Cc}, sigmas.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "composite_rays_train", [&] {
    check_launch(dfk::composite_train_forward<scalar_t>(
                     sigmas.data_ptr<scalar_t>(), rgbs.data_ptr<scalar_t>(),
                     ts.data_ptr<scalar_t>(), rays.data_ptr<int32_t>(), N, static_cast<int>(Cc),
                     static_cast<float>(T_thresh), weights.data_ptr<scalar_t>(),
                     weights_sum.data_ptr<scalar_t>(), depth.data_ptr<scalar_t>(),
                     image.data_ptr<scalar_t>(), stream()),
                 "composite_rays_train");
  });
  return {weights, weights_sum, depth, image};
}

std::vector<at::Tensor> composite_train_backward(
    const at::Tensor& grad_weights, const at::Tensor& grad_weights_sum,
    const at::Tensor& grad_depth, const at::Tensor& grad_image, const at::Tensor& sigmas,
    const at::Tensor& rgbs, const at::Tensor& ts, const at::Tensor& rays, double T_thresh) {
  const auto dt = sigmas.scalar_type();
  for (const at::Tensor* t : {&grad_weights, &grad_weights_sum, &grad_depth, &grad_image, &sigmas,
                        &rgbs, &ts}) {
    DFK_CHECK(*t, dt);
  }
  DFK_CHECK(rays, at::kInt);
  const c10::cuda::CUDAGuard guard(sigmas.device());
  const int64_t N = rays.size(0), Cc = rgbs.size(1);
  auto grad_sigmas = at::zeros_like(sigmas);
  auto grad_rgbs = at::zeros_like(rgbs);
  AT_DISPATCH_FLOATING_TYPES(dt, "composite_rays_train_backward", [&] {
    check_launch(dfk::composite_train_backward<scalar_t>(
                     grad_weights.data_ptr<scalar_t>(), grad_weights_sum.data_ptr<scalar_t>(),
                     grad_depth.data_ptr<scalar_t>(), grad_image.data_ptr<scalar_t>(),
                     sigmas.data_ptr<scalar_t>(), rgbs.data_ptr<scalar_t>(),
                     ts.data_ptr<scalar_t>(), rays.data_ptr<int32_t>(), N, static_cast<int>(Cc),
                     static_cast<float>(T_thresh), grad_sigmas.data_ptr<scalar_t>(),
                     grad_rgbs.data_ptr<scalar_t>(), stream()),
                 "composite_rays_train backward");
  });
  return {grad_sigmas, grad_rgbs};
}

std::vector<at::Tensor> prune_rays_train(const at::Tensor& sigmas, const at::Tensor& ts,
                                         const at::Tensor& rays, double T_min,
                                         int64_t capacity) {
  DFK_CHECK(sigmas, at::kFloat);
  DFK_CHECK(ts, at::kFloat);
  DFK_CHECK(rays, at::kInt);
  TORCH_CHECK(T_min > 0.0, "T_min must be positive");
  const c10::cuda::CUDAGuard guard(sigmas.device());
  const int64_t M = sigmas.size(0), N = rays.size(0);
  auto mask = at::zeros({M}, rays.options());
  auto counts = at::empty({N}, rays.options());
  check_launch(dfk::prune_rays_mark(sigmas.data_ptr<float>(), ts.data_ptr<float>(),
                                    rays.data_ptr<int32_t>(), N, -std::log(T_min),
                                    mask.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), stream()),
               "prune_rays_train (mark)");
  auto csum = mask.cumsum(0, at::kInt);
  // The kept count: on the device (for a fixed capacity: graph replays), else on the host
  // (a sync) to size keep.
  auto total = M > 0 ? csum.narrow(0, M - 1, 1) : at::zeros({1}, rays.options());
  at::Tensor keep;
  if (capacity >= 0) {
    keep = at::zeros({capacity}, rays.options().dtype(at::kLong));
  } else {
    keep = at::empty({total.item<int32_t>()}, rays.options().dtype(at::kLong));
  }
  auto new_rays = at::empty({N, 2}, rays.options());
  check_launch(dfk::prune_rays_write(rays.data_ptr<int32_t>(), mask.data_ptr<int32_t>(),
                                     csum.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), M, N,
                                     keep.data_ptr<int64_t>(), new_rays.data_ptr<int32_t>(),
                                     capacity, stream()),
               "prune_rays_train (write)");
  return {keep, new_rays, total};
}

std::vector<at::Tensor> march_rays(int64_t n_alive, int64_t n_step, const at::Tensor& rays_alive,
                                   at::Tensor rays_t, const at::Tensor& rays_o,
                                   const at::Tensor& rays_d, const at::Tensor& bitfield,
                                   double bound, int64_t C, int64_t G, const at::Tensor& fars,
                                   double dt_gamma, int64_t max_steps, double dt_min,
                                   double dt_max) {
  DFK_CHECK_CUDA(rays_alive);
  DFK_CHECK_CONTIG(rays_alive);
  DFK_CHECK(rays_t, at::kFloat);
  DFK_CHECK(rays_o, at::kFloat);
  DFK_CHECK(rays_d, at::kFloat);
  DFK_CHECK(fars, at::kFloat);
  TORCH_CHECK(rays_alive.numel() >= n_alive, "rays_alive holds fewer than n_alive entries");
  const c10::cuda::CUDAGuard guard(rays_o.device());
  const auto g = grid_spec(bitfield, C, G, bound);
  const auto s = step_spec(dt_min, dt_max, dt_gamma, max_steps);
  const int64_t S = n_alive * n_step;
  auto xyzs = at::zeros({S, 3}, rays_o.options());
  auto dirs = at::empty({S, 3}, rays_o.options());
  auto ts = at::zeros({S, 2}, rays_o.options());
  cudaError_t err;
  if (rays_alive.scalar_type() == at::kInt) {
    err = dfk::march_rays<int32_t>(n_alive, static_cast<int>(n_step),
                                   rays_alive.data_ptr<int32_t>(), rays_t.data_ptr<float>(),
                                   rays_o.data_ptr<float>(), rays_d.data_ptr<float>(),
                                   fars.data_ptr<float>(), g, s, xyzs.data_ptr<float>(),
                                   dirs.data_ptr<float>(), ts.data_ptr<float>(), stream());
  } else {
    DFK_CHECK_DTYPE(rays_alive, at::kLong);
    err = dfk::march_rays<int64_t>(n_alive, static_cast<int>(n_step),
                                   rays_alive.data_ptr<int64_t>(), rays_t.data_ptr<float>(),
                                   rays_o.data_ptr<float>(), rays_d.data_ptr<float>(),
                                   fars.data_ptr<float>(), g, s, xyzs.data_ptr<float>(),
                                   dirs.data_ptr<float>(), ts.data_ptr<float>(), stream());
  }
  check_launch(err, "march_rays");
  return {xyzs, dirs, ts};
}

void composite_rays(int64_t n_alive, int64_t n_step, at::Tensor rays_alive,
                    const at::Tensor& rays_t, const at::Tensor& sigmas, const at::Tensor& rgbs,
                    const at::Tensor& ts, at::Tensor weights_sum, at::Tensor depth,
                    at::Tensor image, const at::Tensor& fars, double T_thresh) {
  DFK_CHECK_CUDA(rays_alive);
  DFK_CHECK_CONTIG(rays_alive);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &rays_t, &sigmas, &rgbs, &ts, &weights_sum, &depth, &image, &fars}) {
    DFK_CHECK(*t, at::kFloat);
  }
  TORCH_CHECK(sigmas.numel() == n_alive * n_step, "sigmas must hold n_alive*n_step values");
  TORCH_CHECK(rgbs.size(-1) == image.size(-1), "rgbs and image channel counts differ");
  const c10::cuda::CUDAGuard guard(sigmas.device());
  const int Cc = static_cast<int>(image.size(-1));
  cudaError_t err;
  if (rays_alive.scalar_type() == at::kInt) {
    err = dfk::composite_rays<int32_t>(
        n_alive, static_cast<int>(n_step), rays_alive.data_ptr<int32_t>(),
        rays_t.data_ptr<float>(), sigmas.data_ptr<float>(), rgbs.data_ptr<float>(),
        ts.data_ptr<float>(), Cc, weights_sum.data_ptr<float>(), depth.data_ptr<float>(),
        image.data_ptr<float>(), fars.data_ptr<float>(), static_cast<float>(T_thresh), stream());
  } else {
    DFK_CHECK_DTYPE(rays_alive, at::kLong);
    err = dfk::composite_rays<int64_t>(
        n_alive, static_cast<int>(n_step), rays_alive.data_ptr<int64_t>(),
        rays_t.data_ptr<float>(), sigmas.data_ptr<float>(), rgbs.data_ptr<float>(),
        ts.data_ptr<float>(), Cc, weights_sum.data_ptr<float>(), depth.data_ptr<float>(),
        image.data_ptr<float>(), fars.data_ptr<float>(), static_cast<float>(T_thresh), stream());
  }
  check_launch(err, "composite_rays");
}

}  // namespace

void register_raymarching(pybind11::module_& m) {
  m.def("near_far_from_aabb", &near_far_from_aabb);
  m.def("morton3D", &morton3d);
  m.def("morton3D_invert", &morton3d_invert);
  m.def("packbits", &packbits);
  m.def("march_rays_train", &march_rays_train);
  m.def("composite_rays_train_forward", &composite_train_forward);
  m.def("composite_rays_train_backward", &composite_train_backward);
  m.def("prune_rays_train", &prune_rays_train);
  m.def("march_rays", &march_rays);
  m.def("composite_rays", &composite_rays);
}
