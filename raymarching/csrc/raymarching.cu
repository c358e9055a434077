// Ray-marching kernels (see raymarching.h and raymarching/_torch_impl.py).
//
// Exactness: sample positions must land in the same occupancy cells as the PyTorch twin, so
// every float operation that decides a cell is written exactly as the twin evaluates it
// (one rounding per torch op). The extension is built with --fmad=false so that nvcc never
// fuses a multiply and an add into an FMA, and without --use_fast_math so that divisions
// stay correctly rounded.
#include <cuda_runtime.h>

#include <cstdint>

#include "raymarching.h"

// The walk below is also compiled for the host (tests of the skipping logic without a GPU),
// where plain float operations round the same way (the host build disables contraction).
#ifdef __CUDA_ARCH__
#define DFK_ADD(a, b) __fadd_rn(a, b)
#define DFK_SUB(a, b) __fsub_rn(a, b)
#define DFK_MUL(a, b) __fmul_rn(a, b)
#define DFK_DIV(a, b) __fdiv_rn(a, b)
#else
#define DFK_ADD(a, b) ((a) + (b))
#define DFK_SUB(a, b) ((a) - (b))
#define DFK_MUL(a, b) ((a) * (b))
#define DFK_DIV(a, b) ((a) / (b))
#endif
#define DFK_HD __host__ __device__ inline

namespace dfk {
namespace {

constexpr int kThreads = 128;

DFK_HD int imin(int a, int b) { return a < b ? a : b; }
DFK_HD int imax(int a, int b) { return a > b ? a : b; }
constexpr int kMaxChannels = 16;  // composite_rays accumulates up to this many in registers

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

// ---------------------------------------------------------------------------------------
// Morton codes (10 bits per axis).

DFK_HD uint32_t split_by_3(uint32_t x) {
  x &= 0x3FF;
  x = (x | (x << 16)) & 0x030000FF;
  x = (x | (x << 8)) & 0x0300F00F;
  x = (x | (x << 4)) & 0x030C30C3;
  x = (x | (x << 2)) & 0x09249249;
  return x;
}

DFK_HD uint32_t compact_by_3(uint32_t x) {
  x &= 0x09249249;
  x = (x | (x >> 2)) & 0x030C30C3;
  x = (x | (x >> 4)) & 0x0300F00F;
  x = (x | (x >> 8)) & 0x030000FF;
  x = (x | (x >> 16)) & 0x3FF;
  return x;
}

DFK_HD uint32_t morton(uint32_t x, uint32_t y, uint32_t z) {
  return split_by_3(x) | (split_by_3(y) << 1) | (split_by_3(z) << 2);
}

// ---------------------------------------------------------------------------------------
// Occupancy cells.

struct Cell {
  int mip;
  int n[3];
};

// ceil(log2(max(mx, 1e-12))) clamped to [0, C-1], from the float's exponent so that it is
// exact (the twin's log2 is exact on the powers of two that decide the boundaries).
DFK_HD int mip_of(float mx, int C) {
  mx = fmaxf(mx, 1e-12f);
  int e;
  const float m = frexpf(mx, &e);  // mx = m * 2^e, m in [0.5, 1)
  const int mip = (m == 0.5f) ? e - 1 : e;
  return imin(imax(mip, 0), C - 1);
}

DFK_HD float cascade_scale(int mip, float bound) {
  return fminf(ldexpf(1.0f, mip), bound);
}

// Sample position, clamped to the box: twin's clamp(o + t*d, -bound, bound).
DFK_HD void position(const float o[3], const float d[3], float t, float bound,
                                float p[3]) {
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    p[i] = fminf(fmaxf(DFK_ADD(o[i], DFK_MUL(t, d[i])), -bound), bound);
  }
}

DFK_HD Cell cell_of(const float p[3], const GridSpec& g) {
  Cell c;
  const float mx = fmaxf(fmaxf(fabsf(p[0]), fabsf(p[1])), fabsf(p[2]));
  c.mip = mip_of(mx, g.C);
  const float scale = cascade_scale(c.mip, g.bound);
  const float Gf = static_cast<float>(g.G);
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    // ((x / scale + 1) * 0.5) * G, one rounding per op as in the twin.
    const float u = DFK_MUL(DFK_MUL(DFK_ADD(DFK_DIV(p[i], scale), 1.0f), 0.5f), Gf);
    c.n[i] = imin(imax(static_cast<int>(floorf(u)), 0), g.G - 1);
  }
  return c;
}

DFK_HD bool occupied(const Cell& c, const GridSpec& g) {
  const int64_t G3 = static_cast<int64_t>(g.G) * g.G * g.G;
  const int64_t idx = c.mip * G3 + morton(c.n[0], c.n[1], c.n[2]);
  return (g.bitfield[idx >> 3] >> (idx & 7)) & 1;
}

// Empty space is skipped a block of kBlock^3 cells at a time when the whole block is empty
// (a ray crossing empty parts of a 128^3 grid steps through tens of blocks instead of
// hundreds of cells). An aligned block is kBlock^3 consecutive Morton indices, so its bits
// are kBlock^3/8 consecutive bytes.
constexpr int kBlockLog2 = 3;
constexpr int kBlock = 1 << kBlockLog2;

DFK_HD bool block_empty(const Cell& c, const GridSpec& g) {
  if (!g.blocks) return false;
  const int64_t G3 = static_cast<int64_t>(g.G) * g.G * g.G;
  const int m = ~(kBlock - 1);
  const int64_t first = c.mip * G3 + morton(c.n[0] & m, c.n[1] & m, c.n[2] & m);
  const uint64_t* q = reinterpret_cast<const uint64_t*>(g.bitfield + (first >> 3));
  uint64_t any = 0;
#pragma unroll
  for (int i = 0; i < kBlock * kBlock * kBlock / 64; ++i) any |= q[i];
  return any == 0;
}

// Cells a and b are in the same aligned block of 2^shift cells per axis (shift 0: same cell).
DFK_HD bool same_cell(const Cell& a, const Cell& b, int shift = 0) {
  return a.mip == b.mip && (a.n[0] >> shift) == (b.n[0] >> shift) &&
         (a.n[1] >> shift) == (b.n[1] >> shift) && (a.n[2] >> shift) == (b.n[2] >> shift);
}

// True when every sample strictly between positions pa and pb (both computed as above, in
// cells ca and cb) is in ca's cell (shift 0) or ca's block (shift kBlockLog2). Float rounding
// is monotone, so each coordinate of a sample between them lies between theirs; that bounds
// max|x| (hence the cascade) and, within one cascade, the cell index per axis. This makes
// empty-space skipping exact, not approximate.
DFK_HD bool same_region(const float pa[3], const float pb[3], const Cell& ca,
                                   const Cell& cb, int C, int shift = 0) {
  if (!same_cell(ca, cb, shift)) return false;
  if (C == 1) return true;
  float lo = 0.0f, hi = 0.0f;
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    const float a = fabsf(pa[i]), b = fabsf(pb[i]);
    hi = fmaxf(hi, fmaxf(a, b));
    if ((pa[i] >= 0.0f) == (pb[i] >= 0.0f)) lo = fmaxf(lo, fminf(a, b));
  }
  return mip_of(lo, C) == ca.mip && mip_of(hi, C) == ca.mip;
}

// Where the ray leaves c's cell (shift 0) or c's block (shift kBlockLog2); an estimate: the
// caller verifies with same_region.
DFK_HD float cell_exit(const float o[3], const float d[3], const Cell& c,
                                  const GridSpec& g, int shift = 0) {
  const float scale = cascade_scale(c.mip, g.bound);
  const float h = 2.0f * scale / static_cast<float>(g.G);
  float t = 3.4e38f;
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    if (d[i] == 0.0f) continue;
    const int lo = (c.n[i] >> shift) << shift;
    const float face = -scale + h * static_cast<float>(d[i] > 0.0f ? lo + (1 << shift) : lo);
    t = fminf(t, (face - o[i]) / d[i]);
  }
  return t;
}

// ---------------------------------------------------------------------------------------
// The lattice. With dt_gamma == 0, t_k = t_base + k * dt_min (no accumulation); otherwise
// t_{k+1} = t_k + clamp(t_k * dt_gamma, dt_min, dt_max).

DFK_HD float lattice_at(float t_base, int k, float dt_min) {
  return DFK_ADD(t_base, DFK_MUL(static_cast<float>(k), dt_min));
}

DFK_HD float step_size(float t, const StepSpec& s) {
  return fminf(fmaxf(DFK_MUL(t, s.dt_gamma), s.dt_min), s.dt_max);
}

// A walk along one ray over lattice indices [0, k_end) from t_base, visiting only lattice
// points in occupied cells before `far`. Empty cells are skipped: from an empty lattice point
// k the walk jumps to the last lattice point still in the same cell, or in the same block when
// the whole block is empty (verified exactly), then continues after it. emit(p, t, dt)
// returns false to stop early. Returns the index of the first lattice point not visited and,
// in *t_next, its position (t_{k_end} or the stop point); with dt_gamma > 0 that position is
// accumulated exactly as the twin does.
struct WalkEnd {
  int k;
  float t;
};

template <typename Emit>
__host__ __device__ WalkEnd walk(const float o[3], const float d[3], float t_base, float far, int k_end,
                        const GridSpec& g, const StepSpec& s, Emit&& emit) {
  const bool uniform = s.dt_gamma == 0.0f;
  int k = 0;
  float t = t_base;  // t_k (tracked for dt_gamma > 0; recomputed from k otherwise)
  while (k < k_end) {
    if (uniform) t = lattice_at(t_base, k, s.dt_min);
    if (!(t < far)) return {k, t};
    const float dt = uniform ? s.dt_min : step_size(t, s);
    float p[3];
    position(o, d, t, g.bound, p);
    const Cell c = cell_of(p, g);
    if (occupied(c, g)) {
      if (!emit(p, t, dt)) return {k + 1, uniform ? lattice_at(t_base, k + 1, s.dt_min)
                                                   : DFK_ADD(t, dt)};
      ++k;
      if (!uniform) t = DFK_ADD(t, dt);
      continue;
    }
    const int shift = block_empty(c, g) ? kBlockLog2 : 0;
    const float t_exit = cell_exit(o, d, c, g, shift);
    if (uniform) {
      // Candidate: the last lattice index before t_exit; shrink until verified.
      const float q = (t_exit - t_base) / s.dt_min;
      int kc = k;
      if (q > static_cast<float>(k)) {
        kc = q >= static_cast<float>(k_end) ? k_end - 1
                                             : imax(k, static_cast<int>(ceilf(q)) - 1);
      }
      bool first = true;
      while (kc > k) {
        const float tc = lattice_at(t_base, kc, s.dt_min);
        if (tc < far) {
          float pc[3];
          position(o, d, tc, g.bound, pc);
          if (same_region(p, pc, c, cell_of(pc, g), g.C, shift)) break;
        }
        // The estimate is usually off by one point at the cell's face; then halve.
        kc = first ? kc - 1 : k + (kc - k) / 2;
        first = false;
      }
      k = kc + 1;
    } else {
      // Accumulate (cheaply, no lookups) to the last lattice point before t_exit.
      int kc = k;
      float tc = t, dtc = dt;
      while (kc + 1 < k_end) {
        const float tn = DFK_ADD(tc, dtc);
        if (!(tn < t_exit) || !(tn < far)) break;
        tc = tn;
        dtc = step_size(tn, s);
        ++kc;
      }
      if (kc > k) {
        float pc[3];
        position(o, d, tc, g.bound, pc);
        if (!same_region(p, pc, c, cell_of(pc, g), g.C, shift)) {
          kc = k;
          tc = t;
          dtc = dt;
        }
      }
      k = kc + 1;
      t = DFK_ADD(tc, dtc);
    }
  }
  return {k, uniform ? lattice_at(t_base, k, s.dt_min) : t};
}

// The twin's first point of the next inference window: the window's last point plus its
// step (cand_t[-1] + cand_dt[-1]), whatever index the walk stopped at.
DFK_HD float t_after_window(const WalkEnd& end, float t_base, int W, const StepSpec& s) {
  if (s.dt_gamma == 0.0f) return DFK_ADD(lattice_at(t_base, W - 1, s.dt_min), s.dt_min);
  float t = end.t;
  for (int k = end.k; k < W; ++k) t = DFK_ADD(t, step_size(t, s));
  return t;
}

DFK_HD float start_t(float near, const float* noise, int64_t n, const StepSpec& s) {
  if (noise == nullptr) return near;
  const float jitter = fminf(fmaxf(DFK_MUL(near, s.dt_gamma), s.dt_min), s.dt_max);
  return DFK_ADD(near, DFK_MUL(noise[n], jitter));
}

// ---------------------------------------------------------------------------------------
// Kernels.

__global__ void near_far_kernel(const float* __restrict__ rays_o, const float* __restrict__ rays_d,
                                const float* __restrict__ aabb, int64_t N, float min_near,
                                float* __restrict__ nears, float* __restrict__ fars) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  float near = -3.4e38f, far = 3.4e38f;
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    float di = rays_d[3 * n + i];
    if (fabsf(di) < 1e-15f) di = 1e-15f;  // the twin's guard, sign included
    const float inv = DFK_DIV(1.0f, di);
    const float o = rays_o[3 * n + i];
    const float t1 = DFK_MUL(DFK_SUB(aabb[i], o), inv);
    const float t2 = DFK_MUL(DFK_SUB(aabb[3 + i], o), inv);
    near = fmaxf(near, fminf(t1, t2));
    far = fminf(far, fmaxf(t1, t2));
  }
  bool miss = far < near;
  near = fmaxf(near, min_near);
  miss = miss || far < near;
  nears[n] = miss ? 1e10f : near;
  fars[n] = miss ? 1e10f : far;
}

__global__ void morton_kernel(const int32_t* __restrict__ coords, int64_t N,
                              int64_t* __restrict__ out) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  out[n] = morton(coords[3 * n], coords[3 * n + 1], coords[3 * n + 2]);
}

__global__ void morton_invert_kernel(const int64_t* __restrict__ idx, int64_t N,
                                     int64_t* __restrict__ out) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  const uint32_t i = static_cast<uint32_t>(idx[n]);
  out[3 * n] = compact_by_3(i);
  out[3 * n + 1] = compact_by_3(i >> 1);
  out[3 * n + 2] = compact_by_3(i >> 2);
}

__global__ void packbits_kernel(const float* __restrict__ grid, int64_t n_bytes, float thresh,
                                uint8_t* __restrict__ out) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= n_bytes) return;
  uint8_t bits = 0;
#pragma unroll
  for (int b = 0; b < 8; ++b) bits |= static_cast<uint8_t>(grid[8 * n + b] > thresh) << b;
  out[n] = bits;
}

DFK_HD void load_ray(const float* rays_o, const float* rays_d, int64_t r, float o[3],
                                float d[3]) {
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    o[i] = rays_o[3 * r + i];
    d[i] = rays_d[3 * r + i];
  }
}

DFK_HD int march_train_count_one(int64_t n, const float* rays_o, const float* rays_d,
                                 const float* nears, const float* fars, const float* noise,
                                 const GridSpec& g, const StepSpec& s) {
  float o[3], d[3];
  load_ray(rays_o, rays_d, n, o, d);
  int count = 0;
  walk(o, d, start_t(nears[n], noise, n, s), fars[n], s.max_steps, g, s,
       [&](const float*, float, float) {
         ++count;
         return true;
       });
  return count;
}

// A ray's count cut to the rows left before a fixed capacity (never negative).
DFK_HD int64_t clip_count(int64_t count, int64_t room) {
  return room <= 0 ? 0 : (count < room ? count : room);
}

__global__ void march_train_count_kernel(const float* __restrict__ rays_o,
                                         const float* __restrict__ rays_d,
                                         const float* __restrict__ nears,
                                         const float* __restrict__ fars,
                                         const float* __restrict__ noise, GridSpec g, StepSpec s,
                                         int64_t N, int32_t* __restrict__ rays,
                                         int32_t* __restrict__ counter, int64_t capacity) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  int count = march_train_count_one(n, rays_o, rays_d, nears, fars, noise, g, s);
  const int32_t off = count > 0 ? atomicAdd(counter, count) : 0;
  // A fixed capacity (graph replays): the ray keeps the part of its slice that fits.
  if (capacity >= 0) count = static_cast<int>(clip_count(count, capacity - off));
  rays[2 * n] = count > 0 ? off : 0;
  rays[2 * n + 1] = count;
}

DFK_HD void march_train_write_one(int64_t n, const float* __restrict__ rays_o,
                                         const float* __restrict__ rays_d,
                                         const float* __restrict__ nears,
                                         const float* __restrict__ fars,
                                         const float* __restrict__ noise, GridSpec g, StepSpec s,
                                         int64_t N, const int32_t* __restrict__ rays,
                                         float* __restrict__ xyzs, float* __restrict__ dirs,
                                         float* __restrict__ ts) {
  const int count = rays[2 * n + 1];
  if (count == 0) return;
  float o[3], d[3];
  load_ray(rays_o, rays_d, n, o, d);
  int64_t j = rays[2 * n];
  const int64_t end = j + count;
  walk(o, d, start_t(nears[n], noise, n, s), fars[n], s.max_steps, g, s,
       [&](const float* p, float t, float dt) {
#pragma unroll
         for (int i = 0; i < 3; ++i) {
           xyzs[3 * j + i] = p[i];
           dirs[3 * j + i] = d[i];
         }
         ts[2 * j] = t;
         ts[2 * j + 1] = dt;
         return ++j < end;
       });
}

__global__ void march_train_write_kernel(const float* __restrict__ rays_o,
                                         const float* __restrict__ rays_d,
                                         const float* __restrict__ nears,
                                         const float* __restrict__ fars,
                                         const float* __restrict__ noise, GridSpec g, StepSpec s,
                                         int64_t N, const int32_t* __restrict__ rays,
                                         float* __restrict__ xyzs, float* __restrict__ dirs,
                                         float* __restrict__ ts) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  march_train_write_one(n, rays_o, rays_d, nears, fars, noise, g, s, N, rays, xyzs, dirs, ts);
}

// Warp-per-ray training march for the uniform lattice (dt_gamma == 0). There the lattice
// t_k = t_base + k * dt_min does not depend on what came before, and walk() emits exactly the
// points k < the first with t_k >= far whose cells are occupied (its skips are verified), so
// each point can be tested on its own: the 32 lanes of a warp take 32 consecutive lattice
// points of one ray at a time. One thread per ray walking serially left most of the GPU idle
// for a 64x64 render's 4096 rays (about one warp per SM, dependent loads); the skips saved
// less than the parallel lanes gain. Same points, same floats, same order as walk().
constexpr unsigned kFullMask = 0xffffffffu;

// Lane's lattice point k = k0 + lane: whether it is before far (and k < max_steps), whether
// it is emitted, and its position.
DFK_HD bool lattice_point(const float o[3], const float d[3], float t_base, float far, int k,
                          const GridSpec& g, const StepSpec& s, float p[3], float* t, bool* in) {
  *t = lattice_at(t_base, k, s.dt_min);
  *in = k < s.max_steps && *t < far;
  if (!*in) return false;
  position(o, d, *t, g.bound, p);
  return occupied(cell_of(p, g), g);
}

__global__ void march_train_count_warp_kernel(const float* __restrict__ rays_o,
                                              const float* __restrict__ rays_d,
                                              const float* __restrict__ nears,
                                              const float* __restrict__ fars,
                                              const float* __restrict__ noise, GridSpec g,
                                              StepSpec s, int64_t N, int32_t* __restrict__ rays,
                                              int32_t* __restrict__ counter, int64_t capacity) {
  const int64_t n = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (n >= N) return;  // whole warps: n is the same on every lane
  float o[3], d[3];
  load_ray(rays_o, rays_d, n, o, d);
  const float t_base = start_t(nears[n], noise, n, s), far = fars[n];
  int count = 0;
  for (int k0 = 0; k0 < s.max_steps; k0 += 32) {
    float p[3], t;
    bool in;
    const bool emit = lattice_point(o, d, t_base, far, k0 + lane, g, s, p, &t, &in);
    count += __popc(__ballot_sync(kFullMask, emit));
    if (__any_sync(kFullMask, !in)) break;  // t_k grows with k: every later point is out too
  }
  if (lane != 0) return;
  const int32_t off = count > 0 ? atomicAdd(counter, count) : 0;
  if (capacity >= 0) count = static_cast<int>(clip_count(count, capacity - off));
  rays[2 * n] = count > 0 ? off : 0;
  rays[2 * n + 1] = count;
}

__global__ void march_train_write_warp_kernel(const float* __restrict__ rays_o,
                                              const float* __restrict__ rays_d,
                                              const float* __restrict__ nears,
                                              const float* __restrict__ fars,
                                              const float* __restrict__ noise, GridSpec g,
                                              StepSpec s, int64_t N, const int32_t* __restrict__ rays,
                                              float* __restrict__ xyzs, float* __restrict__ dirs,
                                              float* __restrict__ ts) {
  const int64_t n = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (n >= N) return;
  const int count = rays[2 * n + 1];
  if (count == 0) return;
  float o[3], d[3];
  load_ray(rays_o, rays_d, n, o, d);
  const float t_base = start_t(nears[n], noise, n, s), far = fars[n];
  const int64_t off = rays[2 * n];
  const unsigned below = (1u << lane) - 1u;  // lanes before this one
  int done = 0;  // samples written by earlier chunks
  for (int k0 = 0; k0 < s.max_steps && done < count; k0 += 32) {
    float p[3], t;
    bool in;
    const bool emit = lattice_point(o, d, t_base, far, k0 + lane, g, s, p, &t, &in);
    const unsigned m = __ballot_sync(kFullMask, emit);
    const int i = done + __popc(m & below);
    if (emit && i < count) {  // a clipped ray (fixed capacity) keeps its first samples
      const int64_t j = off + i;
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        xyzs[3 * j + c] = p[c];
        dirs[3 * j + c] = d[c];
      }
      ts[2 * j] = t;
      ts[2 * j + 1] = s.dt_min;
    }
    done += __popc(m);
    if (__any_sync(kFullMask, !in)) break;
  }
}

// Front-to-back compositing of one ray. T_i = exp(-sum_{j<i} tau_j) with the optical depth
// accumulated in double, as the twin does, so that the T >= T_thresh masks agree.
template <typename scalar_t>
DFK_HD void composite_train_forward_one(int64_t n, const scalar_t* __restrict__ sigmas, const scalar_t* __restrict__ rgbs,
    const scalar_t* __restrict__ ts, const int32_t* __restrict__ rays, int64_t N, int Cc,
    float T_thresh, scalar_t* __restrict__ weights, scalar_t* __restrict__ weights_sum,
    scalar_t* __restrict__ depth, scalar_t* __restrict__ image) {
  const int64_t off = rays[2 * n], count = rays[2 * n + 1];
  double excl = 0.0;
  scalar_t ws = 0, dep = 0;
  scalar_t* img = image + n * Cc;
  for (int64_t i = off; i < off + count; ++i) {
    const scalar_t tau = sigmas[i] * ts[2 * i + 1];
    const scalar_t T = exp(-static_cast<scalar_t>(excl));
    excl += static_cast<double>(tau);
    // Not a break: the twin masks each sample, which differs only for negative densities.
    if (!(T >= static_cast<scalar_t>(T_thresh))) continue;
    const scalar_t w = (scalar_t(1) - exp(-tau)) * T;
    weights[i] = w;
    ws += w;
    dep += w * ts[2 * i];
    for (int c = 0; c < Cc; ++c) img[c] += w * rgbs[i * Cc + c];
  }
  weights_sum[n] = ws;
  depth[n] = dep;
}

template <typename scalar_t>
__global__ void composite_train_forward_kernel(const scalar_t* __restrict__ sigmas, const scalar_t* __restrict__ rgbs,
    const scalar_t* __restrict__ ts, const int32_t* __restrict__ rays, int64_t N, int Cc,
    float T_thresh, scalar_t* __restrict__ weights, scalar_t* __restrict__ weights_sum,
    scalar_t* __restrict__ depth, scalar_t* __restrict__ image) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  composite_train_forward_one<scalar_t>(n, sigmas, rgbs, ts, rays, N, Cc, T_thresh, weights, weights_sum, depth, image);
}

// The gradient g_i reaching w_i (its own, plus weights_sum's, depth's and image's through w_i).
template <typename scalar_t>
DFK_HD scalar_t weight_grad(int64_t i, const scalar_t* __restrict__ gw, scalar_t g_ws, scalar_t g_d,
                            const scalar_t* __restrict__ gimg, const scalar_t* __restrict__ rgbs,
                            const scalar_t* __restrict__ ts, int Cc) {
  scalar_t g = gw[i] + g_ws + g_d * ts[2 * i];
  for (int c = 0; c < Cc; ++c) g += gimg[c] * rgbs[i * Cc + c];
  return g;
}

// d loss / d tau_k = m_k g_k T_k (1 - alpha_k) - sum_{i>k} g_i w_i, where g_i is the
// gradient reaching w_i (its own, plus weights_sum's, depth's and image's through w_i) and
// m_k the (constant) T >= T_thresh mask; d loss / d rgb_kc = w_k grad_image_c.
template <typename scalar_t>
DFK_HD void composite_train_backward_one(int64_t n, const scalar_t* __restrict__ gw, const scalar_t* __restrict__ gws,
    const scalar_t* __restrict__ gdepth, const scalar_t* __restrict__ gimage,
    const scalar_t* __restrict__ sigmas, const scalar_t* __restrict__ rgbs,
    const scalar_t* __restrict__ ts, const int32_t* __restrict__ rays, int64_t N, int Cc,
    float T_thresh, scalar_t* __restrict__ gsig, scalar_t* __restrict__ grgb) {
  const int64_t off = rays[2 * n], count = rays[2 * n + 1];
  const scalar_t* gimg = gimage + n * Cc;
  const scalar_t g_ws = gws[n], g_d = gdepth[n];
  // Pass 1: S = sum_i g_i w_i (in double: the suffix sums below are differences of it).
  double S = 0.0, excl = 0.0;
  for (int64_t i = off; i < off + count; ++i) {
    const scalar_t tau = sigmas[i] * ts[2 * i + 1];
    const scalar_t T = exp(-static_cast<scalar_t>(excl));
    excl += static_cast<double>(tau);
    if (!(T >= static_cast<scalar_t>(T_thresh))) continue;
    const scalar_t w = (scalar_t(1) - exp(-tau)) * T;
    const scalar_t g = weight_grad(i, gw, g_ws, g_d, gimg, rgbs, ts, Cc);
    S += static_cast<double>(g) * static_cast<double>(w);
  }
  // Pass 2: prefix P_k = sum_{i<=k} g_i w_i, so the suffix is S - P_k.
  double P = 0.0;
  excl = 0.0;
  for (int64_t i = off; i < off + count; ++i) {
    const scalar_t dt = ts[2 * i + 1];
    const scalar_t tau = sigmas[i] * dt;
    const scalar_t T = exp(-static_cast<scalar_t>(excl));
    excl += static_cast<double>(tau);
    double dtau = 0.0;
    if (T >= static_cast<scalar_t>(T_thresh)) {
      const scalar_t trans = exp(-tau);
      const scalar_t w = (scalar_t(1) - trans) * T;
      const scalar_t g = weight_grad(i, gw, g_ws, g_d, gimg, rgbs, ts, Cc);
      for (int c = 0; c < Cc; ++c) grgb[i * Cc + c] = w * gimg[c];
      P += static_cast<double>(g) * static_cast<double>(w);
      dtau = static_cast<double>(g) * static_cast<double>(T * trans);
    }
    dtau -= S - P;
    gsig[i] = static_cast<scalar_t>(dtau * static_cast<double>(dt));
  }
}

template <typename scalar_t>
__global__ void composite_train_backward_kernel(const scalar_t* __restrict__ gw, const scalar_t* __restrict__ gws,
    const scalar_t* __restrict__ gdepth, const scalar_t* __restrict__ gimage,
    const scalar_t* __restrict__ sigmas, const scalar_t* __restrict__ rgbs,
    const scalar_t* __restrict__ ts, const int32_t* __restrict__ rays, int64_t N, int Cc,
    float T_thresh, scalar_t* __restrict__ gsig, scalar_t* __restrict__ grgb) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  composite_train_backward_one<scalar_t>(n, gw, gws, gdepth, gimage, sigmas, rgbs, ts, rays, N, Cc, T_thresh, gsig, grgb);
}

// Warp-per-ray compositing (training): one thread per ray leaves most of the GPU idle for a
// 64x64 render's 4096 rays (about one warp per SM), each walking ~100 samples with dependent
// loads. Here the 32 lanes of a warp take 32 consecutive samples of one ray at a time; the
// optical depth before each sample is a warp scan (in double, as the sequential sum) plus the
// carry of earlier chunks, and per-ray sums are warp reductions. Same masks and formulas as
// the *_one functions above; only the order of the additions differs.
constexpr int kWarpChannels = 16;  // colour channels held in registers (more: thread per ray)

__device__ inline double warp_inclusive_sum(double x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int s = 1; s < 32; s <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, x, s);
    if (lane >= s) x += y;
  }
  return x;
}

template <typename T>
__device__ inline T warp_sum(T x) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) x += __shfl_xor_sync(0xffffffffu, x, s);
  return x;
}

// One chunk of 32 samples of a ray (lane k: sample i = chunk start + k, valid if i < end): the
// sample's optical depth tau (0 past the end) and the transmittance before it; ``carry`` (the
// optical depth before the chunk) moves past the chunk.
template <typename scalar_t>
__device__ inline scalar_t chunk_transmittance(const scalar_t* __restrict__ sigmas,
                                               const scalar_t* __restrict__ ts, int64_t i,
                                               bool valid, double& carry, scalar_t& tau) {
  tau = valid ? sigmas[i] * ts[2 * i + 1] : scalar_t(0);
  const double incl = warp_inclusive_sum(static_cast<double>(tau));
  const scalar_t T = exp(-static_cast<scalar_t>(carry + incl - static_cast<double>(tau)));
  carry += __shfl_sync(0xffffffffu, incl, 31);
  return T;
}

template <typename scalar_t>
__global__ void composite_train_forward_warp_kernel(const scalar_t* __restrict__ sigmas,
    const scalar_t* __restrict__ rgbs, const scalar_t* __restrict__ ts,
    const int32_t* __restrict__ rays, int64_t N, int Cc, float T_thresh,
    scalar_t* __restrict__ weights, scalar_t* __restrict__ weights_sum,
    scalar_t* __restrict__ depth, scalar_t* __restrict__ image) {
  const int64_t n = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (n >= N) return;  // warp-uniform: the whole warp has the same ray
  const int64_t off = rays[2 * n], end = off + rays[2 * n + 1];
  double carry = 0.0;  // optical depth before this chunk
  scalar_t ws = 0, dep = 0, img[kWarpChannels];
#pragma unroll
  for (int c = 0; c < kWarpChannels; ++c) img[c] = 0;
  for (int64_t base = off; base < end; base += 32) {
    const int64_t i = base + lane;
    const bool valid = i < end;
    scalar_t tau;
    const scalar_t T = chunk_transmittance(sigmas, ts, i, valid, carry, tau);
    if (!valid || !(T >= static_cast<scalar_t>(T_thresh))) continue;
    const scalar_t w = (scalar_t(1) - exp(-tau)) * T;
    weights[i] = w;
    ws += w;
    dep += w * ts[2 * i];
#pragma unroll
    for (int c = 0; c < kWarpChannels; ++c) {
      if (c < Cc) img[c] += w * rgbs[i * Cc + c];
    }
  }
  ws = warp_sum(ws);
  dep = warp_sum(dep);
#pragma unroll
  for (int c = 0; c < kWarpChannels; ++c) {
    if (c < Cc) img[c] = warp_sum(img[c]);
  }
  if (lane == 0) {
    weights_sum[n] = ws;
    depth[n] = dep;
    for (int c = 0; c < Cc; ++c) image[n * Cc + c] = img[c];
  }
}

template <typename scalar_t>
__global__ void composite_train_backward_warp_kernel(const scalar_t* __restrict__ gw,
    const scalar_t* __restrict__ gws, const scalar_t* __restrict__ gdepth,
    const scalar_t* __restrict__ gimage, const scalar_t* __restrict__ sigmas,
    const scalar_t* __restrict__ rgbs, const scalar_t* __restrict__ ts,
    const int32_t* __restrict__ rays, int64_t N, int Cc, float T_thresh,
    scalar_t* __restrict__ gsig, scalar_t* __restrict__ grgb) {
  const int64_t n = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (n >= N) return;
  const int64_t off = rays[2 * n], end = off + rays[2 * n + 1];
  const scalar_t* gimg = gimage + n * Cc;
  const scalar_t g_ws = gws[n], g_d = gdepth[n];
  // Pass 1: S = sum_i g_i w_i (in double: the suffix sums below are differences of it).
  double S = 0.0, carry = 0.0;
  for (int64_t base = off; base < end; base += 32) {
    const int64_t i = base + lane;
    const bool valid = i < end;
    scalar_t tau;
    const scalar_t T = chunk_transmittance(sigmas, ts, i, valid, carry, tau);
    if (valid && T >= static_cast<scalar_t>(T_thresh)) {
      const scalar_t w = (scalar_t(1) - exp(-tau)) * T;
      S += static_cast<double>(weight_grad(i, gw, g_ws, g_d, gimg, rgbs, ts, Cc)) *
           static_cast<double>(w);
    }
  }
  S = warp_sum(S);
  // Pass 2: P_k = sum_{i<=k} g_i w_i (a warp scan plus the carry); d tau_k as in the
  // thread-per-ray kernel.
  double P = 0.0;
  carry = 0.0;
  for (int64_t base = off; base < end; base += 32) {
    const int64_t i = base + lane;
    const bool valid = i < end;
    const scalar_t dt = valid ? ts[2 * i + 1] : scalar_t(0);
    scalar_t tau;
    const scalar_t T = chunk_transmittance(sigmas, ts, i, valid, carry, tau);
    const bool on = valid && T >= static_cast<scalar_t>(T_thresh);
    scalar_t trans = 0, w = 0, g = 0;
    if (on) {
      trans = exp(-tau);
      w = (scalar_t(1) - trans) * T;
      g = weight_grad(i, gw, g_ws, g_d, gimg, rgbs, ts, Cc);
      for (int c = 0; c < Cc; ++c) grgb[i * Cc + c] = w * gimg[c];
    }
    const double gw_incl = warp_inclusive_sum(static_cast<double>(g) * static_cast<double>(w));
    const double Pk = P + gw_incl;
    P += __shfl_sync(0xffffffffu, gw_incl, 31);
    if (!valid) continue;
    double dtau = on ? static_cast<double>(g) * static_cast<double>(T * trans) : 0.0;
    dtau -= S - Pk;
    gsig[i] = static_cast<scalar_t>(dtau * static_cast<double>(dt));
  }
}

// Inference marching: the twin visits lattice points in windows of W = max(2*n_step, 16)
// restarted from the window's first point, so positions are t_base + j*dt_min with t_base
// advancing window by window; we reproduce that rounding exactly.
template <typename index_t>
DFK_HD void march_rays_one(int64_t i, int64_t n_alive, int n_step, const index_t* __restrict__ alive,
                                  float* __restrict__ rays_t, const float* __restrict__ rays_o,
                                  const float* __restrict__ rays_d, const float* __restrict__ fars,
                                  GridSpec g, StepSpec s, float* __restrict__ xyzs,
                                  float* __restrict__ dirs, float* __restrict__ ts) {
  const int64_t r = alive[i];
  if (r < 0) return;
  float o[3], d[3];
  load_ray(rays_o, rays_d, r, o, d);
  for (int k = 0; k < n_step; ++k) {
#pragma unroll
    for (int c = 0; c < 3; ++c) dirs[3 * (i * n_step + k) + c] = d[c];
  }
  const float far = fars[r];
  const int W = imax(2 * n_step, 16);
  float t_base = rays_t[r];
  int count = 0;
  while (t_base < far) {
    const int64_t slot0 = i * n_step;
    const WalkEnd end = walk(o, d, t_base, far, W, g, s, [&](const float* p, float t, float dt) {
      const int64_t j = slot0 + count;
#pragma unroll
      for (int c = 0; c < 3; ++c) xyzs[3 * j + c] = p[c];
      ts[2 * j] = t;
      ts[2 * j + 1] = dt;
      return ++count < n_step;
    });
    if (count == n_step) {
      // Next point after the last sample: within the window, t_base + j*dt_min; after its
      // last point, that point plus its step (the twin's cand_t[-1] + cand_dt[-1]).
      t_base = end.k < W ? end.t : t_after_window(end, t_base, W, s);
      break;
    }
    t_base = t_after_window(end, t_base, W, s);
  }
  rays_t[r] = t_base;
}

template <typename index_t>
__global__ void march_rays_kernel(int64_t n_alive, int n_step, const index_t* __restrict__ alive,
                                  float* __restrict__ rays_t, const float* __restrict__ rays_o,
                                  const float* __restrict__ rays_d, const float* __restrict__ fars,
                                  GridSpec g, StepSpec s, float* __restrict__ xyzs,
                                  float* __restrict__ dirs, float* __restrict__ ts) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_alive) return;
  march_rays_one<index_t>(i, n_alive, n_step, alive, rays_t, rays_o, rays_d, fars, g, s, xyzs, dirs, ts);
}

// Inference compositing of one alive ray's n_step samples, starting from T0 = 1 - weights_sum.
// Within the batch T follows the twin: exp of a float-rounded cumulative sum (accumulated in
// double, as torch's CPU cumsum does) minus the sample's own tau.
template <typename index_t>
DFK_HD void composite_rays_one(int64_t i, int64_t n_alive, int n_step, index_t* __restrict__ alive,
                                      const float* __restrict__ rays_t,
                                      const float* __restrict__ sigmas,
                                      const float* __restrict__ rgbs, const float* __restrict__ ts,
                                      int Cc, float* __restrict__ weights_sum,
                                      float* __restrict__ depth, float* __restrict__ image,
                                      const float* __restrict__ fars, float T_thresh) {
  const int64_t r = alive[i];
  if (r < 0) return;
  const float T0 = fmaxf(1.0f - weights_sum[r], 0.0f);
  double csum = 0.0;
  float tau_sum = 0.0f, ws = 0.0f, dep = 0.0f;
  float acc[kMaxChannels];
#pragma unroll
  for (int c = 0; c < kMaxChannels; ++c) acc[c] = 0.0f;
  for (int k = 0; k < n_step; ++k) {
    const int64_t j = i * n_step + k;
    const float dt = ts[2 * j + 1];
    const float tau = sigmas[j] * dt;
    csum += static_cast<double>(tau);
    tau_sum += tau;
    const float T = T0 * expf(-(static_cast<float>(csum) - tau));
    if (!(T >= T_thresh && dt > 0.0f)) continue;
    const float w = (1.0f - expf(-tau)) * T;
    ws += w;
    dep += w * ts[2 * j];
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c) {
      if (c < Cc) acc[c] += w * rgbs[j * Cc + c];
    }
  }
  weights_sum[r] += ws;
  depth[r] += dep;
#pragma unroll
  for (int c = 0; c < kMaxChannels; ++c) {
    if (c < Cc) image[r * Cc + c] += acc[c];
  }
  const float T_end = T0 * expf(-tau_sum);
  if (T_end < T_thresh || rays_t[r] >= fars[r]) alive[i] = -1;
}

template <typename index_t>
__global__ void composite_rays_kernel(int64_t n_alive, int n_step, index_t* __restrict__ alive,
                                      const float* __restrict__ rays_t,
                                      const float* __restrict__ sigmas,
                                      const float* __restrict__ rgbs, const float* __restrict__ ts,
                                      int Cc, float* __restrict__ weights_sum,
                                      float* __restrict__ depth, float* __restrict__ image,
                                      const float* __restrict__ fars, float T_thresh) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_alive) return;
  composite_rays_one<index_t>(i, n_alive, n_step, alive, rays_t, sigmas, rgbs, ts, Cc, weights_sum, depth, image, fars, T_thresh);
}

__global__ void prune_mark_kernel(const float* __restrict__ sigmas, const float* __restrict__ ts,
                                  const int32_t* __restrict__ rays, int64_t N, double max_depth,
                                  int32_t* __restrict__ mask, int32_t* __restrict__ counts) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= N) return;
  const int64_t off = rays[2 * r], count = rays[2 * r + 1];
  double excl = 0.0;
  int32_t kept = 0;
  for (int64_t i = off; i < off + count; ++i) {
    const int32_t m = excl <= max_depth;
    mask[i] = m;
    kept += m;
    excl += static_cast<double>(sigmas[i]) * static_cast<double>(ts[2 * i + 1]);
  }
  counts[r] = kept;
}

__global__ void prune_keep_kernel(const int32_t* __restrict__ mask, const int32_t* __restrict__ csum,
                                  int64_t M, int64_t* __restrict__ keep, int64_t capacity) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= M || !mask[i]) return;
  const int64_t j = csum[i] - 1;
  if (capacity < 0 || j < capacity) keep[j] = i;
}

__global__ void prune_rays_kernel(const int32_t* __restrict__ rays, const int32_t* __restrict__ mask,
                                  const int32_t* __restrict__ csum, const int32_t* __restrict__ counts,
                                  int64_t N, int32_t* __restrict__ new_rays, int64_t capacity) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= N) return;
  const int64_t off = rays[2 * r];
  int32_t k = counts[r];
  const int32_t start = k > 0 ? csum[off] - mask[off] : 0;
  if (capacity >= 0) k = static_cast<int32_t>(clip_count(k, capacity - start));
  new_rays[2 * r] = k > 0 ? start : 0;
  new_rays[2 * r + 1] = k;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Launchers.

cudaError_t prune_rays_mark(const float* sigmas, const float* ts, const int32_t* rays, int64_t N,
                            double max_depth, int32_t* mask, int32_t* counts,
                            cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  prune_mark_kernel<<<blocks_for(N), kThreads, 0, stream>>>(sigmas, ts, rays, N, max_depth, mask,
                                                            counts);
  return cudaGetLastError();
}

cudaError_t prune_rays_write(const int32_t* rays, const int32_t* mask, const int32_t* csum,
                             const int32_t* counts, int64_t M, int64_t N, int64_t* keep,
                             int32_t* new_rays, int64_t capacity, cudaStream_t stream) {
  if (M > 0) {
    prune_keep_kernel<<<blocks_for(M), kThreads, 0, stream>>>(mask, csum, M, keep, capacity);
  }
  if (N > 0) {
    prune_rays_kernel<<<blocks_for(N), kThreads, 0, stream>>>(rays, mask, csum, counts, N,
                                                              new_rays, capacity);
  }
  return cudaGetLastError();
}

cudaError_t near_far_from_aabb(const float* rays_o, const float* rays_d, const float* aabb,
                               int64_t N, float min_near, float* nears, float* fars,
                               cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  near_far_kernel<<<blocks_for(N), kThreads, 0, stream>>>(rays_o, rays_d, aabb, N, min_near,
                                                          nears, fars);
  return cudaGetLastError();
}

cudaError_t morton3d(const int32_t* coords, int64_t N, int64_t* out, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  morton_kernel<<<blocks_for(N), kThreads, 0, stream>>>(coords, N, out);
  return cudaGetLastError();
}

cudaError_t morton3d_invert(const int64_t* indices, int64_t N, int64_t* out,
                            cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  morton_invert_kernel<<<blocks_for(N), kThreads, 0, stream>>>(indices, N, out);
  return cudaGetLastError();
}

cudaError_t packbits(const float* grid, int64_t n_bytes, float thresh, uint8_t* out,
                     cudaStream_t stream) {
  if (n_bytes == 0) return cudaSuccess;
  packbits_kernel<<<blocks_for(n_bytes), kThreads, 0, stream>>>(grid, n_bytes, thresh, out);
  return cudaGetLastError();
}

cudaError_t march_rays_train_count(const float* rays_o, const float* rays_d, const float* nears,
                                   const float* fars, const float* noise, GridSpec grid,
                                   StepSpec step, int64_t N, int32_t* rays, int32_t* counter,
                                   int64_t capacity, bool warp, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (warp && step.dt_gamma == 0.0f) {
    march_train_count_warp_kernel<<<blocks_for(N * 32), kThreads, 0, stream>>>(
        rays_o, rays_d, nears, fars, noise, grid, step, N, rays, counter, capacity);
    return cudaGetLastError();
  }
  march_train_count_kernel<<<blocks_for(N), kThreads, 0, stream>>>(
      rays_o, rays_d, nears, fars, noise, grid, step, N, rays, counter, capacity);
  return cudaGetLastError();
}

cudaError_t march_rays_train_write(const float* rays_o, const float* rays_d, const float* nears,
                                   const float* fars, const float* noise, GridSpec grid,
                                   StepSpec step, int64_t N, const int32_t* rays, float* xyzs,
                                   float* dirs, float* ts, bool warp, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (warp && step.dt_gamma == 0.0f) {
    march_train_write_warp_kernel<<<blocks_for(N * 32), kThreads, 0, stream>>>(
        rays_o, rays_d, nears, fars, noise, grid, step, N, rays, xyzs, dirs, ts);
    return cudaGetLastError();
  }
  march_train_write_kernel<<<blocks_for(N), kThreads, 0, stream>>>(
      rays_o, rays_d, nears, fars, noise, grid, step, N, rays, xyzs, dirs, ts);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t composite_train_forward(const scalar_t* sigmas, const scalar_t* rgbs,
                                    const scalar_t* ts, const int32_t* rays, int64_t N, int Cc,
                                    float T_thresh, scalar_t* weights, scalar_t* weights_sum,
                                    scalar_t* depth, scalar_t* image, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (Cc <= kWarpChannels) {
    composite_train_forward_warp_kernel<scalar_t><<<blocks_for(N * 32), kThreads, 0, stream>>>(
        sigmas, rgbs, ts, rays, N, Cc, T_thresh, weights, weights_sum, depth, image);
    return cudaGetLastError();
  }
  composite_train_forward_kernel<scalar_t><<<blocks_for(N), kThreads, 0, stream>>>(
      sigmas, rgbs, ts, rays, N, Cc, T_thresh, weights, weights_sum, depth, image);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t composite_train_backward(const scalar_t* grad_weights,
                                     const scalar_t* grad_weights_sum,
                                     const scalar_t* grad_depth, const scalar_t* grad_image,
                                     const scalar_t* sigmas, const scalar_t* rgbs,
                                     const scalar_t* ts, const int32_t* rays, int64_t N, int Cc,
                                     float T_thresh, scalar_t* grad_sigmas, scalar_t* grad_rgbs,
                                     cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (Cc <= kWarpChannels) {
    composite_train_backward_warp_kernel<scalar_t><<<blocks_for(N * 32), kThreads, 0, stream>>>(
        grad_weights, grad_weights_sum, grad_depth, grad_image, sigmas, rgbs, ts, rays, N, Cc,
        T_thresh, grad_sigmas, grad_rgbs);
    return cudaGetLastError();
  }
  composite_train_backward_kernel<scalar_t><<<blocks_for(N), kThreads, 0, stream>>>(
      grad_weights, grad_weights_sum, grad_depth, grad_image, sigmas, rgbs, ts, rays, N, Cc,
      T_thresh, grad_sigmas, grad_rgbs);
  return cudaGetLastError();
}

template <typename index_t>
cudaError_t march_rays(int64_t n_alive, int n_step, const index_t* rays_alive, float* rays_t,
                       const float* rays_o, const float* rays_d, const float* fars,
                       GridSpec grid, StepSpec step, float* xyzs, float* dirs, float* ts,
                       cudaStream_t stream) {
  if (n_alive == 0) return cudaSuccess;
  march_rays_kernel<index_t><<<blocks_for(n_alive), kThreads, 0, stream>>>(
      n_alive, n_step, rays_alive, rays_t, rays_o, rays_d, fars, grid, step, xyzs, dirs, ts);
  return cudaGetLastError();
}

template <typename index_t>
cudaError_t composite_rays(int64_t n_alive, int n_step, index_t* rays_alive,
                           const float* rays_t, const float* sigmas, const float* rgbs,
                           const float* ts, int Cc, float* weights_sum, float* depth,
                           float* image, const float* fars, float T_thresh,
                           cudaStream_t stream) {
  if (n_alive == 0) return cudaSuccess;
  if (Cc > kMaxChannels) return cudaErrorInvalidValue;
  composite_rays_kernel<index_t><<<blocks_for(n_alive), kThreads, 0, stream>>>(
      n_alive, n_step, rays_alive, rays_t, sigmas, rgbs, ts, Cc, weights_sum, depth, image,
      fars, T_thresh);
  return cudaGetLastError();
}

#define DFK_COMPOSITE_TRAIN(T)                                                              \
  template cudaError_t composite_train_forward<T>(const T*, const T*, const T*,            \
                                                  const int32_t*, int64_t, int, float, T*, \
                                                  T*, T*, T*, cudaStream_t);               \
  template cudaError_t composite_train_backward<T>(const T*, const T*, const T*, const T*, \
                                                   const T*, const T*, const T*,           \
                                                   const int32_t*, int64_t, int, float, T*,\
                                                   T*, cudaStream_t);
DFK_COMPOSITE_TRAIN(float)
DFK_COMPOSITE_TRAIN(double)

#define DFK_INFERENCE(I)                                                                     \
  template cudaError_t march_rays<I>(int64_t, int, const I*, float*, const float*,          \
                                     const float*, const float*, GridSpec, StepSpec, float*, \
                                     float*, float*, cudaStream_t);                          \
  template cudaError_t composite_rays<I>(int64_t, int, I*, const float*, const float*,      \
                                         const float*, const float*, int, float*, float*,   \
                                         float*, const float*, float, cudaStream_t);
DFK_INFERENCE(int32_t)
DFK_INFERENCE(int64_t)

}  // namespace dfk
