// The one Python module of all our CUDA kernels (ray marching, grid encoding, the fused Adan
// step and the VAE's GroupNorm): a single extension keeps the first-use build to one link and
// lets ninja compile every file at once.
#include <pybind11/pybind11.h>

void register_raymarching(pybind11::module_& m);
void register_gridencoder(pybind11::module_& m);
void register_adan(pybind11::module_& m);
void register_groupnorm(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dreamfusion CUDA kernels: ray marching, hash-grid encoding, fused Adan, GroupNorm";
  register_raymarching(m);
  register_gridencoder(m);
  register_adan(m);
  register_groupnorm(m);
}
