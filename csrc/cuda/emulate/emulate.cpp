// The fiber scheduler behind emulate.h (see there for the model). Fibers start with
// makecontext/swapcontext and then switch with _setjmp/_longjmp, which skips the signal-mask
// system call of swapcontext: the kernels' warp collectives switch fibers millions of times.
#undef _FORTIFY_SOURCE  // its longjmp check rejects jumps between (fiber) stacks
#include "emulate.h"

#include <setjmp.h>
#include <ucontext.h>

#include <cstdio>
#include <deque>
#include <memory>
#include <vector>

namespace attnkit_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kSlotWords = 8;

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Thread {
  ucontext_t ctx;  // only to start the fiber
  jmp_buf jb;      // where it yielded
  bool started = false;
  std::unique_ptr<char[]> stack;
  Idx idx{0, 0, 0};
  bool done = false;
  std::vector<Copy> pending;             // issued, not committed
  std::deque<std::vector<Copy>> groups;  // committed, not yet waited for
};

struct Warp {
  int alive = 0, arrived = 0;
  unsigned gen = 0;
  uint64_t slot[32][kSlotWords];
};

struct Block {
  Idx block_idx{0, 0, 0}, block_dim{1, 1, 1}, grid_dim{1, 1, 1};
  int nthreads = 0, alive = 0, arrived = 0, or_acc = 0, or_result = 0;
  unsigned gen = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;
  ucontext_t sched;
  jmp_buf sched_jb;
  int cur = 0;
  uint64_t progress = 0;
  const std::function<void()>* body = nullptr;
};

Block* g_block = nullptr;

Thread& self() { return g_block->threads[size_t(g_block->cur)]; }
Warp& my_warp() { return g_block->warps[size_t(g_block->cur / 32)]; }

void yield() {
  if (!_setjmp(self().jb)) _longjmp(g_block->sched_jb, 1);
}

void apply(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    std::memset(c.dst, 0, 16);
    if (c.bytes > 0) std::memcpy(c.dst, c.src, size_t(c.bytes));
  }
}

// Barrier release checks also run when a thread exits (exited threads no longer count).
void maybe_release_block() {
  Block& b = *g_block;
  if (b.arrived > 0 && b.arrived == b.alive) {
    b.arrived = 0;
    b.or_result = b.or_acc;
    b.or_acc = 0;
    ++b.gen;
    ++b.progress;
  }
}
void maybe_release_warp(Warp& w) {
  if (w.arrived > 0 && w.arrived == w.alive) {
    w.arrived = 0;
    ++w.gen;
    ++g_block->progress;
  }
}

void thread_main() {
  (*g_block->body)();
  Thread& t = self();
  if (!t.pending.empty() || !t.groups.empty()) {
    // A thread may exit with copies in flight only if nobody reads them: apply them anyway.
    for (auto& g : t.groups) apply(g);
    apply(t.pending);
  }
  t.done = true;
  --g_block->alive;
  Warp& w = my_warp();
  --w.alive;
  ++g_block->progress;
  maybe_release_block();
  maybe_release_warp(w);
  _longjmp(g_block->sched_jb, 1);  // never returns: the fiber's stack is abandoned
}

void run_block(Block& b) {
  b.alive = b.nthreads;
  b.arrived = b.or_acc = 0;
  for (size_t w = 0; w < b.warps.size(); ++w) {
    b.warps[w].alive = std::min(32, b.nthreads - int(w) * 32);
    b.warps[w].arrived = 0;
  }
  for (int i = 0; i < b.nthreads; ++i) {
    Thread& t = b.threads[size_t(i)];
    t.done = false;
    t.started = false;
    t.pending.clear();
    t.groups.clear();
    t.idx = {unsigned(i) % b.block_dim.x, (unsigned(i) / b.block_dim.x) % b.block_dim.y,
             unsigned(i) / (b.block_dim.x * b.block_dim.y)};
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.get();
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &b.sched;
    makecontext(&t.ctx, thread_main, 0);
  }
  while (b.alive > 0) {
    const uint64_t before = b.progress;
    for (int i = 0; i < b.nthreads; ++i) {
      if (b.threads[size_t(i)].done) continue;
      b.cur = i;
      Thread& t = b.threads[size_t(i)];
      if (!_setjmp(b.sched_jb)) {
        if (!t.started) {
          t.started = true;
          swapcontext(&b.sched, &t.ctx);  // runs until the fiber's first yield (a _longjmp back)
        } else {
          _longjmp(t.jb, 1);
        }
      }
    }
    if (b.progress == before) {
      std::fprintf(stderr,
                   "attnkit CUDA emulator: deadlock in block (%u, %u, %u): a barrier or warp "
                   "collective that not every live thread reaches\n",
                   b.block_idx.x, b.block_idx.y, b.block_idx.z);
      std::abort();
    }
  }
}

}  // namespace

const Idx& thread_idx() { return self().idx; }
const Idx& block_idx() { return g_block->block_idx; }
const Idx& block_dim() { return g_block->block_dim; }
const Idx& grid_dim() { return g_block->grid_dim; }
unsigned char* dynamic_smem() { return g_block->smem.data(); }
int lane_id() { return g_block->cur % 32; }

void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  Block b;
  Block* prev = g_block;
  b.block_dim = {block.x, block.y, block.z};
  b.grid_dim = {grid.x, grid.y, grid.z};
  b.nthreads = int(block.x * block.y * block.z);
  b.threads.resize(size_t(b.nthreads));
  for (Thread& t : b.threads) t.stack.reset(new char[kStackBytes]);
  b.warps.resize(size_t((b.nthreads + 31) / 32));
  b.body = &body;
  g_block = &b;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.block_idx = {x, y, z};
        // Fresh shared memory per block, filled with NaN bytes so unwritten reads show.
        b.smem.assign(smem_bytes + 16, 0xff);
        run_block(b);
      }
  g_block = prev;
}

void sync_block() { (void)sync_block_or(0); }

int sync_block_or(int pred) {
  Block& b = *g_block;
  const unsigned gen = b.gen;
  b.or_acc |= pred != 0;
  ++b.arrived;
  ++b.progress;
  maybe_release_block();
  while (b.gen == gen) yield();
  return b.or_result;
}

void sync_warp() {
  Warp& w = my_warp();
  const unsigned gen = w.gen;
  ++w.arrived;
  ++g_block->progress;
  maybe_release_warp(w);
  while (w.gen == gen) yield();
}

void warp_publish(const uint64_t* words, int n) {
  Warp& w = my_warp();
  std::memcpy(w.slot[lane_id()], words, sizeof(uint64_t) * size_t(n));
  sync_warp();
}
const uint64_t* warp_slot(int lane) { return my_warp().slot[lane]; }
void warp_done_reading() { sync_warp(); }

void cp_async(void* dst, const void* src, int src_bytes) {
  self().pending.push_back({dst, src, src_bytes});
}
void cp_async_commit() {
  Thread& t = self();
  t.groups.push_back(std::move(t.pending));
  t.pending.clear();
}
void cp_async_wait(int keep) {
  Thread& t = self();
  while (int(t.groups.size()) > keep) {
    apply(t.groups.front());
    t.groups.pop_front();
  }
}

}  // namespace attnkit_emu
