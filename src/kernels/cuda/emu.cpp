// The emulator's runtime (see emu.h): the kernel registry and `mt_emu_launch`, which
// runs a grid block by block with one OS thread per CUDA thread.
#include "emu.h"

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace mt_emu {
struct Block {
  dim3 dim, grid;
  unsigned threads;
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> exchange;
  // Dynamic shared memory, 128-byte aligned as common.cuh declares it.
  std::unique_ptr<unsigned char, decltype(&std::free)> shared;
  Block(dim3 d, dim3 g, unsigned shared_bytes)
      : dim(d), grid(g), threads(d.x * d.y * d.z), all(threads), exchange(threads),
        shared(static_cast<unsigned char *>(std::aligned_alloc(128, (shared_bytes + 127) / 128 * 128 + 128)),
               &std::free) {
    for (unsigned w = 0; w * 32 < threads; w++)
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - w * 32)));
  }
};

thread_local uint3 thread_idx;
thread_local uint3 block_idx;
thread_local Block *block;

const dim3 &block_dim() { return block->dim; }
const dim3 &grid_dim() { return block->grid; }
static unsigned linear_id() {
  return thread_idx.x + block->dim.x * (thread_idx.y + block->dim.y * thread_idx.z);
}
unsigned lane_id() { return linear_id() % 32; }
unsigned warp_size_of_this_warp() { return std::min(32u, block->threads - linear_id() / 32 * 32); }
void sync_block() { block->all.arrive_and_wait(); }
void sync_warp() { block->warps[linear_id() / 32]->arrive_and_wait(); }
uint64_t &exchange_slot() { return block->exchange[linear_id()]; }
uint64_t exchange_read(unsigned lane) { return block->exchange[linear_id() / 32 * 32 + lane]; }
unsigned char *dynamic_shared() { return block->shared.get(); }

static std::mutex fault_lock;
static std::string first_fault;
void fault(const char *what) {
  std::lock_guard<std::mutex> lock(fault_lock);
  if (first_fault.empty()) first_fault = what;
}

struct Kernel {
  void *fn;
  Trampoline call;
  unsigned arity;
  unsigned threads;  // __launch_bounds__
};
static std::map<std::string, Kernel> &registry() {
  static std::map<std::string, Kernel> r;
  return r;
}
void register_kernel(const char *name, void *fn, Trampoline t, unsigned arity, unsigned threads) {
  registry()[name] = Kernel{fn, t, arity, threads};
}

static void run_block(const Kernel &k, void **args, dim3 grid, dim3 dim, uint3 b, unsigned shared) {
  Block blk(dim, grid, shared);
  std::vector<std::thread> threads;
  for (unsigned z = 0; z < dim.z; z++)
    for (unsigned y = 0; y < dim.y; y++)
      for (unsigned x = 0; x < dim.x; x++)
        threads.emplace_back([&, x, y, z] {
          thread_idx = {x, y, z};
          block_idx = b;
          block = &blk;
          k.call(k.fn, args);
          // A thread that has returned no longer takes part in barriers, as on a GPU.
          unsigned lin = linear_id();
          blk.warps[lin / 32]->arrive_and_drop();
          blk.all.arrive_and_drop();
        });
  for (auto &t : threads) t.join();
}
}  // namespace mt_emu

// A kernel's __launch_bounds__ (0: no such kernel).
extern "C" unsigned mt_emu_kernel_threads(const char *name) {
  auto it = mt_emu::registry().find(name);
  return it == mt_emu::registry().end() ? 0 : it->second.threads;
}

// Calls f(name, threads) for every registered kernel.
extern "C" void mt_emu_kernels(void (*f)(const char *, unsigned, void *), void *ctx) {
  for (auto &[name, k] : mt_emu::registry()) f(name.c_str(), k.threads, ctx);
}

// 0: ran; 1: unknown kernel; 2: wrong number of arguments; 3: bad launch geometry;
// 4: the kernel broke a CUDA rule, named in `fault` (NUL-terminated, at most fault_len bytes).
extern "C" int mt_emu_launch(const char *name, const unsigned *grid, const unsigned *block,
                             unsigned shared, void **args, unsigned nargs, char *fault,
                             unsigned fault_len) {
  using namespace mt_emu;
  // `__shared__` arrays are statics: one launch at a time in the whole process.
  static std::mutex one_at_a_time;
  std::lock_guard<std::mutex> lock(one_at_a_time);
  auto it = registry().find(name);
  if (it == registry().end()) return 1;
  if (it->second.arity != nargs) return 2;
  dim3 g{grid[0], grid[1], grid[2]}, d{block[0], block[1], block[2]};
  unsigned threads = d.x * d.y * d.z;
  if (threads == 0 || threads > 1024 || g.x * g.y * g.z == 0 || shared > 227 * 1024) return 3;
  if (g.y > 65535 || g.z > 65535) return 3;
  first_fault.clear();
  for (unsigned z = 0; z < g.z; z++)
    for (unsigned y = 0; y < g.y; y++)
      for (unsigned x = 0; x < g.x; x++) run_block(it->second, args, g, d, {x, y, z}, shared);
  if (first_fault.empty()) return 0;
  std::snprintf(fault, fault_len, "%s", first_fault.c_str());
  return 4;
}
