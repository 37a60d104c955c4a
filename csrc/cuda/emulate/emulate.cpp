// The fiber scheduler behind emulate.h (see there for the model). Fibers start with
// makecontext/swapcontext and then switch with _setjmp/_longjmp, which skips the signal-mask
// system call of swapcontext: the kernels' warp collectives switch fibers millions of times.
#undef _FORTIFY_SOURCE  // its longjmp check rejects jumps between (fiber) stacks
#include "emulate.h"

#include <setjmp.h>
#include <ucontext.h>

#include <cstdio>
#include <deque>
#include <map>
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

// One thread's share of an issued wgmma: its 2 rows x 16 values of A, 16 x N/4 values of B
// (the columns its accumulator slice holds), and where in shared memory each came from
// (kFromRegs for A fragments), to check at the wait that nothing overwrote them meanwhile.
constexpr uint32_t kFromRegs = 0xffffffffu;
struct WgOp {
  int n = 0;
  bool bf16 = false, accumulate = false;
  float* d = nullptr;
  std::vector<uint16_t> a, b;       // a[row * 16 + k] (row 0/1), b[k * (n / 4) + c]
  std::vector<uint32_t> a_at, b_at;  // smem offsets
  const uint32_t* a_regs = nullptr;  // the thread's A fragment registers, and their values
  uint32_t a_vals[4] = {0, 0, 0, 0};
};

struct NamedBar {
  int threads = 0, arrived = 0;
  unsigned gen = 0;
};

struct Mbar {
  int pending = 0, expected = 0;
  int64_t tx = 0;
  unsigned phase = 0;  // completed phases
};

// Asynchronous operations issued by a thread, committed in groups and performed at the wait
// that retires their group (cp.async and wgmma alike).
template <class Op>
struct Groups {
  std::vector<Op> pending;                  // issued, not committed
  std::deque<std::vector<Op>> committed;    // committed, not yet waited for
  bool empty() const { return pending.empty() && committed.empty(); }
  void clear() {
    pending.clear();
    committed.clear();
  }
  void commit() {
    committed.push_back(std::move(pending));
    pending.clear();
  }
  // Performs the oldest groups until at most `keep` remain.
  template <class Run>
  void wait(int keep, Run run) {
    while (int(committed.size()) > keep) {
      for (const Op& op : committed.front()) run(op);
      committed.pop_front();
    }
  }
};

struct Thread {
  ucontext_t ctx;  // only to start the fiber
  jmp_buf jb;      // where it yielded
  bool started = false;
  std::unique_ptr<char[]> stack;
  Idx idx{0, 0, 0};
  bool done = false;
  Groups<Copy> copies;  // cp.async
  Groups<WgOp> wgmmas;
  std::map<float*, std::vector<float>> wg_acc;  // accumulators in flight: their values at issue
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
  std::map<const void*, Mbar> mbars;
  std::map<int, NamedBar> named;
};

Block* g_block = nullptr;

Thread& self() { return g_block->threads[size_t(g_block->cur)]; }
Warp& my_warp() { return g_block->warps[size_t(g_block->cur / 32)]; }

void yield() {
  if (!_setjmp(self().jb)) _longjmp(g_block->sched_jb, 1);
}

void apply(const Copy& c) {
  std::memset(c.dst, 0, 16);
  if (c.bytes > 0) std::memcpy(c.dst, c.src, size_t(c.bytes));
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

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "attnkit CUDA emulator: %s (block (%u, %u, %u), thread %d)\n", what,
               g_block->block_idx.x, g_block->block_idx.y, g_block->block_idx.z, g_block->cur);
  std::abort();
}

void thread_main() {
  (*g_block->body)();
  Thread& t = self();
  if (!t.wgmmas.empty()) fail("a thread exited with wgmma in flight");
  if (!t.copies.empty()) {
    // A thread may exit with copies in flight only if nobody reads them: apply them anyway.
    t.copies.commit();
    t.copies.wait(0, apply);
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
    t.copies.clear();
    t.wgmmas.clear();
    t.wg_acc.clear();
    t.idx = {unsigned(i) % b.block_dim.x, (unsigned(i) / b.block_dim.x) % b.block_dim.y,
             unsigned(i) / (b.block_dim.x * b.block_dim.y)};
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.get();
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &b.sched;
    makecontext(&t.ctx, thread_main, 0);
  }
  b.mbars.clear();
  b.named.clear();
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
  for (const auto& nb : b.named)
    if (nb.second.arrived != 0) {
      std::fprintf(stderr,
                   "attnkit CUDA emulator: named barrier %d of block (%u, %u, %u) has %d of %d "
                   "arrivals pending at exit\n",
                   nb.first, b.block_idx.x, b.block_idx.y, b.block_idx.z, nb.second.arrived,
                   nb.second.threads);
      std::abort();
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
  self().copies.pending.push_back({dst, src, src_bytes});
}
void cp_async_commit() {
  self().copies.commit();
}
void cp_async_wait(int keep) { self().copies.wait(keep, apply); }

// ---- Hopper primitives ----

namespace {

uint16_t smem_u16(uint32_t off) {
  uint16_t v;
  std::memcpy(&v, g_block->smem.data() + off, 2);
  return v;
}
// SWIZZLE_128B: address bits 4-6 (the 16-byte chunk in a 128-byte row) ^= bits 7-9 (the row
// in an 8-row, 1024-byte atom).
uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

Mbar& mbar_of(uint64_t* bar) {
  auto it = g_block->mbars.find(bar);
  if (it == g_block->mbars.end()) fail("mbarrier used before mbarrier.init");
  return it->second;
}
void mbar_settle(Mbar& m) {
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.expected;
    ++g_block->progress;
  }
}

// Shared-memory offset of element (mn, k) of a 128B-swizzled operand (PTX ISA, "Matrix
// Descriptor" / canonical layouts): K-major rows of 128 bytes in 8-row groups SBO apart;
// MN-major rows are K (128 bytes: 64 MN values), 64-value MN panels LBO apart, 8-row K groups
// SBO apart.
uint32_t operand_offset(uint64_t desc, bool mn_major, int mn, int k) {
  const uint32_t start = uint32_t(desc & 0x3fff) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3fff) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3fff) << 4;
  if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0)
    fail("wgmma descriptor: only 128B-swizzled operands with base offset 0 are emulated");
  uint32_t addr;
  if (!mn_major)
    addr = start + uint32_t(mn % 8) * 128 + uint32_t(mn / 8) * sbo + uint32_t(k) * 2;
  else
    addr = start + uint32_t(mn % 64) * 2 + uint32_t(mn / 64) * lbo + uint32_t(k % 8) * 128 + uint32_t(k / 8) * sbo;
  addr = swizzle128(addr);
  if (size_t(addr) + 2 > g_block->smem.size()) fail("wgmma operand outside shared memory");
  return addr;
}

// The registers of an in-flight wgmma belong to it until wgmma.wait_group (PTX ISA): its A
// fragments and accumulators must hold, when it runs, what they held at issue.
void wgmma_check_registers(const WgOp& op) {
  if (op.a_regs)
    for (int i = 0; i < 4; ++i)
      if (op.a_regs[i] != op.a_vals[i]) fail("the A registers of an in-flight wgmma were written before wgmma.wait_group");
  auto& acc = self().wg_acc;
  auto it = acc.find(op.d);
  if (it == acc.end()) return;  // a later wgmma of a chain on the same accumulators
  if (std::memcmp(it->second.data(), op.d, it->second.size() * sizeof(float)) != 0)
    fail("the accumulator registers of an in-flight wgmma were written before wgmma.wait_group");
  acc.erase(it);
}

void wgmma_run(const WgOp& op) {
  wgmma_check_registers(op);
  for (size_t i = 0; i < op.a_at.size(); ++i)
    if (op.a_at[i] != kFromRegs && smem_u16(op.a_at[i]) != op.a[i])
      fail("a wgmma's A operand in shared memory changed before wgmma.wait_group");
  for (size_t i = 0; i < op.b_at.size(); ++i)
    if (smem_u16(op.b_at[i]) != op.b[i]) fail("a wgmma's B operand in shared memory changed before wgmma.wait_group");
  const int cols = op.n / 4;
  float res[256 / 2];
  for (int j = 0; j < op.n / 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = e >> 1, c = 2 * j + (e & 1);  // column 8j + 2t + (e & 1)
      float acc = op.accumulate ? op.d[4 * j + e] : 0.0f;
      for (int k = 0; k < 16; ++k)
        acc += attnkit::cuda::bits_to_float(op.a[size_t(row * 16 + k)], op.bf16) *
               attnkit::cuda::bits_to_float(op.b[size_t(k * cols + c)], op.bf16);
      res[4 * j + e] = acc;
    }
  for (int i = 0; i < op.n / 2; ++i) op.d[i] = res[i];
}

}  // namespace

uint32_t smem_offset(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = g_block->smem.data();
  if (c < base || c >= base + g_block->smem.size()) fail("not a shared-memory address");
  return uint32_t(c - base);
}

void mbar_init(uint64_t* bar, int count) {
  Mbar m;
  m.pending = m.expected = count;
  g_block->mbars[bar] = m;
  ++g_block->progress;
}

void mbar_arrive(uint64_t* bar, uint32_t expect_tx) {
  Mbar& m = mbar_of(bar);
  m.tx += expect_tx;
  --m.pending;
  ++g_block->progress;
  mbar_settle(m);
  // A scheduling point: the threads this arrival releases (a producer waiting for a free
  // stage) run before the arriving thread goes on, as they may on a GPU -- so a stage freed
  // before its last reader's wgmma.wait_group is overwritten before that wait, and the wait
  // aborts.
  yield();
}

void mbar_wait(uint64_t* bar, int parity) {
  while (true) {
    const Mbar& m = mbar_of(bar);
    if (int(m.phase & 1u) != (parity & 1)) return;
    yield();  // no progress of its own: all threads waiting with nothing in flight is a deadlock
  }
}

void tma_load(const TmaDesc& d, uint64_t* bar, void* smem, int c0, int c1, int c2, int c3) {
  const uint32_t dst = smem_offset(smem);
  if (dst % 1024 != 0) fail("TMA with 128B swizzle into shared memory that is not 1024-aligned");
  const uint32_t bytes = uint32_t(d.box_rows) * 128;
  if (size_t(dst) + bytes > g_block->smem.size()) fail("TMA box outside shared memory");
  const int64_t c[4] = {c0, c1, c2, c3};
  for (int r = 0; r < d.box_rows; ++r)
    for (int e = 0; e < 64; ++e) {
      const int64_t x[4] = {c[0] + e, c[1] + r, c[2], c[3]};
      uint16_t v = 0;
      bool in = true;
      for (int i = 0; i < 4; ++i) in = in && x[i] >= 0 && x[i] < d.dims[i];
      if (in) {
        const unsigned char* src = static_cast<const unsigned char*>(d.base);
        int64_t off = 0;
        for (int i = 0; i < 4; ++i) off += x[i] * d.strides[i];
        std::memcpy(&v, src + off, 2);
      }
      std::memcpy(g_block->smem.data() + swizzle128(dst + uint32_t(r * 128 + e * 2)), &v, 2);
    }
  Mbar& m = mbar_of(bar);
  m.tx -= bytes;
  ++g_block->progress;
  mbar_settle(m);
}

void wgmma(int n, bool bf16, uint64_t da, const uint32_t* a_regs, uint64_t db, bool b_mn_major, float* d,
           bool accumulate) {
  if (n % 8 != 0 || n < 8 || n > 256) fail("wgmma: N must be a multiple of 8 in [8, 256]");
  WgOp op;
  op.n = n;
  op.bf16 = bf16;
  op.accumulate = accumulate;
  op.d = d;
  const int l = g_block->cur % 32, g = l >> 2, t = l & 3;
  const int w = (g_block->cur / 32) % 4;  // warp within the warpgroup: rows 16w .. 16w + 15
  op.a.resize(32);
  op.a_at.resize(32);
  if (a_regs) {
    // The mma.sync A-fragment layout per warp: a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..),
    // a3 (g+8, 2t+8..); the low half holds the even column.
    uint64_t words[4] = {a_regs[0], a_regs[1], a_regs[2], a_regs[3]};
    warp_publish(words, 4);
    for (int row = 0; row < 2; ++row)
      for (int k = 0; k < 16; ++k) {
        const int reg = row + (k >= 8 ? 2 : 0), lane = g * 4 + (k % 8) / 2;
        const uint64_t word = warp_slot(lane)[reg];
        op.a[size_t(row * 16 + k)] = uint16_t(k % 2 ? word >> 16 : word & 0xffff);
        op.a_at[size_t(row * 16 + k)] = kFromRegs;
      }
    warp_done_reading();
  } else {
    for (int row = 0; row < 2; ++row)
      for (int k = 0; k < 16; ++k) {
        const uint32_t at = operand_offset(da, false, 16 * w + g + 8 * row, k);
        op.a_at[size_t(row * 16 + k)] = at;
        op.a[size_t(row * 16 + k)] = smem_u16(at);
      }
  }
  const int cols = n / 4;
  op.b.resize(size_t(16 * cols));
  op.b_at.resize(size_t(16 * cols));
  for (int k = 0; k < 16; ++k)
    for (int c = 0; c < cols; ++c) {
      const int col = 8 * (c / 2) + 2 * t + (c & 1);
      const uint32_t at = operand_offset(db, b_mn_major, col, k);
      op.b_at[size_t(k * cols + c)] = at;
      op.b[size_t(k * cols + c)] = smem_u16(at);
    }
  if (a_regs) {
    op.a_regs = a_regs;
    for (int i = 0; i < 4; ++i) op.a_vals[i] = a_regs[i];
  }
  Thread& th = self();
  if (!th.wg_acc.count(d)) th.wg_acc[d] = std::vector<float>(d, d + n / 2);
  th.wgmmas.pending.push_back(std::move(op));
}

void wgmma_commit() {
  self().wgmmas.commit();
}

void wgmma_wait(int keep) {
  Thread& t = self();
  if (!t.wgmmas.pending.empty()) fail("wgmma.wait_group with uncommitted wgmma (missing commit_group)");
  t.wgmmas.wait(keep, wgmma_run);
}

void named_barrier(int id, int threads, bool wait) {
  if (id <= 0 || id >= 16 || threads <= 0 || threads % 32 != 0) fail("named barrier: bad id or thread count");
  NamedBar& nb = g_block->named[id];
  if (nb.arrived == 0) nb.threads = threads;
  if (nb.threads != threads) fail("named barrier: arrivals disagree on the thread count");
  const unsigned gen = nb.gen;
  ++nb.arrived;
  ++g_block->progress;
  if (nb.arrived == nb.threads) {
    nb.arrived = 0;
    ++nb.gen;
  }
  if (wait)
    while (g_block->named[id].gen == gen) yield();
  else
    yield();  // a scheduling point, as mbar_arrive
}

}  // namespace attnkit_emu
