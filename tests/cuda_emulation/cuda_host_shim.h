// Just enough of CUDA to run a kernel body on the CPU, one std::thread per
// CUDA thread: threadIdx / blockIdx, __syncthreads(_or) on a std::barrier,
// dynamic shared memory, atomicAdd on an int, fp16 / bf16 storage types and
// a WMMA whose fragments hold the whole 16x16 tile in every thread (WMMA fixes
// no element-to-thread mapping, so kernels that only use load / mma / store / fill and elementwise
// updates behave the same). It checks the indexing, tiling, synchronisation
// and arithmetic of a kernel, not its speed, registers or the GPU's hardware
// limits; the GPU tests do that. Test-only code, never part of the package.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define CK_CUDA_HOST_EMULATION 1
#define CK_HAS_SM80_MMA 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(x) alignas(x)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace ck_emulation {
inline std::barrier<>* block_barrier = nullptr;
inline std::atomic<int> or_flag{0};
alignas(128) inline unsigned char dynamic_smem[256 * 1024];
}  // namespace ck_emulation

#define CK_DYNAMIC_SMEM(name) unsigned char* name = ck_emulation::dynamic_smem

inline void __syncthreads() { ck_emulation::block_barrier->arrive_and_wait(); }

inline int __syncthreads_or(int predicate) {
  if (predicate) ck_emulation::or_flag.store(1);
  __syncthreads();
  const int result = ck_emulation::or_flag.load();
  __syncthreads();
  if (threadIdx.x == 0) ck_emulation::or_flag.store(0);
  __syncthreads();
  return result;
}

// Shared-memory atomics: the block's threads are std::threads.
inline int atomicAdd(int* address, int value) {
  return std::atomic_ref<int>(*address).fetch_add(value);
}

[[noreturn]] inline void __trap() { std::abort(); }

// fp16 storage: the compiler's _Float16 (IEEE binary16, round to nearest even).
using __half = _Float16;
inline float __half2float(__half v) { return static_cast<float>(v); }
inline __half __float2half(float v) { return static_cast<__half>(v); }

// bf16 storage: the top 16 bits of a float, rounded to nearest even.
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

// cvt.rna.tf32.f32: round to nearest, ties away from zero, 10 mantissa bits.
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & 0xFFFFE000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

inline float element_to_float(float v) { return v; }
inline float element_to_float(__half v) { return __half2float(v); }
inline float element_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class Use, int M, int N, int K>
struct fragment_shape;
template <int M, int N, int K>
struct fragment_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct fragment_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct fragment_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = fragment_shape<Use, M, N, K>::rows;
  static constexpr int cols = fragment_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];  // x[r * cols + c]
};

template <class Use, int M, int N, int K, class T, class Layout, class S>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const S* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = element_to_float(
          std::is_same_v<Layout, col_major> ? p[size_t(c) * ldm + r] : p[size_t(r) * ldm + c]);
}

template <int M, int N, int K, class T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, float v) {
  for (float& e : f.x) e = v;
}

template <int M, int N, int K, class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

// One lane writes (every lane holds the same tile); kernels synchronise
// before anyone reads what was stored, as they must on the GPU.
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]) = f.x[r * N + c];
}
}  // namespace wmma
}  // namespace nvcuda

namespace ck_emulation {
// Runs kernel(args...) over the grid, one block at a time, every thread of a
// block on its own std::thread.
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::memset(dynamic_smem, 0xFF, sizeof(dynamic_smem));  // garbage, as on a GPU
      std::barrier<> bar(threads);
      block_barrier = &bar;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([=] {
          threadIdx = dim3{t, 0, 0};
          blockIdx = dim3{bx, by, 0};
          kernel(args...);
        });
      for (auto& th : pool) th.join();
      block_barrier = nullptr;
    }
}
}  // namespace ck_emulation
