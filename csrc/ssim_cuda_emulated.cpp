// ssim_cuda_emulated.cpp: the CUDA kernels' block code (ssim_cuda_blocks.h, minmax_cuda_blocks.h) run
// on the host, every thread of every block, with the checks that cuda_emulator.h describes; registered
// by ops.cpp as the test-only ops ssimkd::*_cuda_emulated. How CI on machines without a GPU tests the
// CUDA kernels against the reference, and for races, bounds, uninitialised reads and barrier
// divergence.
//
// A block's kThreads logical threads are fibers on the calling OS thread. Each runs until it reaches
// SSIMKD_SYNC() (or returns); when all have, the runner checks that they wait at the same barrier,
// opens the next barrier interval and resumes them in thread order. Blocks run one after another.
#define SSIMKD_CUDA_EMULATION
#include "minmax_cuda_blocks.h"
#include "ssim_cuda_blocks.h"
#include "static_switch.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__) && defined(__ELF__) && !defined(SSIMKD_EMULATION_UCONTEXT)
#define SSIMKD_FIBER_ASM 1
#else
#include <ucontext.h>
#endif

namespace ssimkd {
namespace emu {
namespace {

// ------------------------------------------------------------------------------------------------
// Fibers. Measured on a 2-core x86-64 (AMD EPYC), 256 logical threads meeting at a barrier: ~9 us a
// round with the hand-written switch below (callee-saved registers, MXCSR and the x87 control word),
// ~240 us with glibc's swapcontext (a sigprocmask system call per switch), 1-2 ms with 256 OS threads
// and std::barrier. So x86-64 uses the switch below; other machines ucontext.
// ------------------------------------------------------------------------------------------------
#ifdef SSIMKD_FIBER_ASM
extern "C" void ssimkd_fiber_switch(void** save_sp, void* load_sp);
extern "C" void ssimkd_fiber_entry();
asm(R"(
  .text
  .p2align 4
  .globl ssimkd_fiber_switch
  .hidden ssimkd_fiber_switch
  .type ssimkd_fiber_switch, @function
ssimkd_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ssimkd_fiber_switch, .-ssimkd_fiber_switch

  .p2align 4
  .globl ssimkd_fiber_entry
  .hidden ssimkd_fiber_entry
  .type ssimkd_fiber_entry, @function
ssimkd_fiber_entry:
  movq %r12, %rdi
  andq $-16, %rsp
  callq *%r13
  ud2
  .size ssimkd_fiber_entry, .-ssimkd_fiber_entry
)");

struct Fiber {
  void* sp = nullptr;
};

// A fresh fiber on the stack below `top` that will call fn(arg) when first switched to: the frame
// ssimkd_fiber_switch pops (control words, r15, r14, r13 = fn, r12 = arg, rbx, rbp) and its return
// address, the entry stub.
void fiber_start(Fiber& f, char* top, void (*fn)(void*), void* arg) {
  auto* slot = reinterpret_cast<uint64_t*>(top);
  uint32_t mxcsr = 0;
  uint16_t fpu_cw = 0;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpu_cw));
  *--slot = reinterpret_cast<uint64_t>(&ssimkd_fiber_entry);
  *--slot = 0;                                // rbp
  *--slot = 0;                                // rbx
  *--slot = reinterpret_cast<uint64_t>(arg);  // r12
  *--slot = reinterpret_cast<uint64_t>(fn);   // r13
  *--slot = 0;                                // r14
  *--slot = 0;                                // r15
  *--slot = uint64_t(mxcsr) | (uint64_t(fpu_cw) << 32);
  f.sp = slot;
}

void fiber_switch(Fiber& from, Fiber& to) {
  ssimkd_fiber_switch(&from.sp, to.sp);
}
#else
struct Fiber {
  ucontext_t context;
  void (*fn)(void*) = nullptr;
  void* arg = nullptr;
};

thread_local Fiber* t_entering = nullptr;  // the fiber being switched to, for its first run

void fiber_entry() {
  t_entering->fn(t_entering->arg);
}

void fiber_start(Fiber& f, char* top, size_t size, void (*fn)(void*), void* arg) {
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = top - size;
  f.context.uc_stack.ss_size = size;
  f.context.uc_link = nullptr;
  f.fn = fn;
  f.arg = arg;
  makecontext(&f.context, &fiber_entry, 0);
}

void fiber_switch(Fiber& from, Fiber& to) {
  t_entering = &to;
  swapcontext(&from.context, &to.context);
}
#endif

// Fiber stacks, each above a guard page, so an overflow faults instead of corrupting its neighbour.
class Stacks {
 public:
  static constexpr size_t kSize = 128 * 1024;
  explicit Stacks(int count) : count_(count), page_(size_t(sysconf(_SC_PAGESIZE))) {
    bytes_ = size_t(count) * (kSize + page_);
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("ssimkd emulation: cannot map fiber stacks");
    base_ = static_cast<char*>(p);
    for (int i = 0; i < count; ++i) mprotect(base_ + size_t(i) * (kSize + page_), page_, PROT_NONE);
  }
  ~Stacks() { munmap(base_, bytes_); }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  char* top(int i) const { return base_ + size_t(i + 1) * (kSize + page_); }
  int count() const { return count_; }

 private:
  int count_;
  size_t page_, bytes_;
  char* base_;
};

// ------------------------------------------------------------------------------------------------
// Planted bugs (tests only) and the barrier sites met so far
// ------------------------------------------------------------------------------------------------
struct Planted {
  std::mutex mutex;
  std::atomic<int> bug{0};
  std::atomic<int> value{0};
  std::string site;  // kDropBarrier: a site label, or "*"
};
Planted g_planted;

std::mutex g_sites_mutex;
std::vector<std::string> g_sites;  // labels, in the order first met

// "path/to/file.h", 42 -> "file.h:42"
std::string site_label(const std::source_location& loc) {
  const char* file = loc.file_name();
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(loc.line());
}

// A report from inside a logical thread; the runner rethrows it as a torch error.
struct Violation : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// "thread 7", "threads 0-3, 7, 9-255"
std::string threads_phrase(const std::vector<int>& tids) {
  std::ostringstream out;
  out << (tids.size() == 1 ? "thread " : "threads ");
  for (size_t i = 0; i < tids.size();) {
    size_t j = i;
    while (j + 1 < tids.size() && tids[j + 1] == tids[j] + 1) ++j;
    out << (i ? ", " : "") << tids[i];
    if (j > i) out << "-" << tids[j];
    i = j + 1;
  }
  return out.str();
}

}  // namespace

struct GlobalTensor {
  TensorExtent extent;
  int order[4];  // dims by decreasing stride: the greedy decomposition of an offset into an index
  std::string label;
};

namespace {

enum class Run : uint8_t { kRunnable, kWaiting, kDone, kFailed };

class Runner;

struct LogicalThread {
  Runner* runner;
  int tid;
  Fiber fiber;
  Run state;
  uint8_t stage;
  int site;           // the barrier it waits at (an index into Runner::sites_)
  uint32_t barriers;  // barriers passed
};

// One erased call of a kernel's thread body.
using ThreadBody = void (*)(const void* body, const cuda_detail::Thread& th, int64_t block, void* smem, Shadow* shadow,
                            int smem_elements, const BlockState* state);

void thread_main(void* arg);

class Runner {
 public:
  Runner() : stacks_(cuda_detail::kThreads), threads_(size_t(cuda_detail::kThreads)) {
    stage_names_.push_back("setup");
  }

  // Every block of one kernel launch; throws the first violation.
  void run(const std::string& kernel, int64_t blocks, int threads, int smem_elements, size_t element_size,
           ThreadBody body, const void* ctx) {
    if (threads > stacks_.count()) throw std::logic_error("ssimkd emulation: too many threads per block");
    kernel_ = kernel;
    threads_count_ = threads;
    body_ = body;
    body_ctx_ = ctx;
    smem_elements_ = smem_elements;
    smem_.assign((size_t(smem_elements) * element_size + 7) / 8 + 1, 0.0);
    shadow_.resize(size_t(smem_elements));
    {
      std::lock_guard<std::mutex> lock(g_planted.mutex);
      planted_site_ = g_planted.site;
    }
    for (int64_t b = 0; b < blocks; ++b) run_block(b);
  }

  // ---- called from the logical threads
  void wait_at_barrier(const std::source_location& loc) {
    const int site = site_index(loc);
    if (g_planted.bug.load(std::memory_order_relaxed) == int(PlantedBug::kDropBarrier) &&
        (planted_site_ == "*" || planted_site_ == sites_[size_t(site)].label))
      return;
    LogicalThread& t = threads_[size_t(state_.tid)];
    t.state = Run::kWaiting;
    t.site = site;
    fiber_switch(t.fiber, main_);
  }

  void set_stage(const char* name) {
    uint8_t id = 0;
    while (id < stage_names_.size() && stage_names_[id] != name && std::strcmp(stage_names_[id], name) != 0) ++id;
    if (id == stage_names_.size()) {
      if (stage_names_.size() == 255) throw std::logic_error("ssimkd emulation: too many stages");
      stage_names_.push_back(name);
    }
    threads_[size_t(state_.tid)].stage = id;
    state_.stage = id;
  }

  void note_uninitialised_read(const char* buffer, int index) {
    if (!uninitialised_read_.empty()) return;  // the interval's first is reported
    uninitialised_read_ = "ssimkd emulated initcheck: read of " + std::string(buffer) + "[" + std::to_string(index) +
                          "] before any thread wrote it, thread " + std::to_string(state_.tid) + " in stage '" +
                          stage_names_[state_.stage] + "', " + where();
  }

  const char* stage_name(uint8_t id) const { return stage_names_[id]; }
  const BlockState& state() const { return state_; }
  std::string where() const { return "block " + std::to_string(block_) + " of " + kernel_; }

  // ---- the launch's tensors
  void set_tensors(const std::vector<TensorExtent>& tensors) {
    tensors_.clear();
    for (const TensorExtent& e : tensors) {
      if (e.data == nullptr) continue;
      GlobalTensor t{
          e, {0, 1, 2, 3}, std::string(e.role) + (e.level >= 0 ? " of level " + std::to_string(e.level) : "")};
      std::stable_sort(t.order, t.order + e.dim, [&](int a, int b) { return e.strides[a] > e.strides[b]; });
      auto [it, fresh] = tensors_.try_emplace(e.data, t);
      if (fresh) continue;
      const TensorExtent& old = it->second.extent;
      const bool same = old.dim == e.dim && old.element_size == e.element_size &&
                        std::equal(old.sizes, old.sizes + e.dim, e.sizes) &&
                        std::equal(old.strides, old.strides + e.dim, e.strides);
      if (!same)
        throw std::logic_error("ssimkd emulation: tensors " + it->second.label + " and " + t.label +
                               " share an address with different shapes");
      it->second.label += " (also " + t.label + ")";
    }
  }
  void clear_tensors() { tensors_.clear(); }
  const GlobalTensor* find(const void* data) const {
    auto it = tensors_.find(data);
    return it == tensors_.end() ? nullptr : &it->second;
  }

 private:
  friend void thread_main(void* arg);

  int site_index(const std::source_location& loc) {
    for (size_t i = 0; i < sites_.size(); ++i)
      if (sites_[i].line == loc.line() &&
          (sites_[i].file == loc.file_name() || std::strcmp(sites_[i].file, loc.file_name()) == 0))
        return int(i);
    sites_.push_back({loc.file_name(), loc.line(), site_label(loc)});
    std::lock_guard<std::mutex> lock(g_sites_mutex);
    if (std::find(g_sites.begin(), g_sites.end(), sites_.back().label) == g_sites.end())
      g_sites.push_back(sites_.back().label);
    return int(sites_.size() - 1);
  }

  void run_block(int64_t block) {
    block_ = block;
    std::memset(static_cast<void*>(shadow_.data()), 0, shadow_.size() * sizeof(Shadow));
    std::memset(static_cast<void*>(smem_.data()), 0xff, smem_.size() * sizeof(double));  // NaN for a read that escapes
    state_ = {1, 0, 0};
    uninitialised_read_.clear();
    for (int t = 0; t < threads_count_; ++t) {
      LogicalThread& lt = threads_[size_t(t)];
      lt.runner = this;
      lt.tid = t;
      lt.state = Run::kRunnable;
      lt.stage = 0;
      lt.site = -1;
      lt.barriers = 0;
#ifdef SSIMKD_FIBER_ASM
      fiber_start(lt.fiber, stacks_.top(t), &thread_main, &lt);
#else
      fiber_start(lt.fiber, stacks_.top(t), Stacks::kSize, &thread_main, &lt);
#endif
    }
    for (;;) {
      for (int t = 0; t < threads_count_; ++t) {
        LogicalThread& lt = threads_[size_t(t)];
        if (lt.state != Run::kRunnable) continue;
        state_.tid = t;
        state_.stage = lt.stage;
        fiber_switch(main_, lt.fiber);
        if (lt.state == Run::kFailed) TORCH_CHECK(false, error_);
      }
      TORCH_CHECK(uninitialised_read_.empty(), uninitialised_read_);
      if (!barrier_agrees()) TORCH_CHECK(false, error_);
      bool any_waiting = false;
      for (int t = 0; t < threads_count_; ++t) {
        LogicalThread& lt = threads_[size_t(t)];
        if (lt.state != Run::kWaiting) continue;
        lt.state = Run::kRunnable;
        ++lt.barriers;
        any_waiting = true;
      }
      if (!any_waiting) return;
      ++state_.epoch;
    }
  }

  // After a round: every thread waits at the same barrier, or every thread has returned.
  bool barrier_agrees() {
    std::vector<int> done;
    std::vector<std::vector<int>> by_site(sites_.size());
    for (int t = 0; t < threads_count_; ++t) {
      const LogicalThread& lt = threads_[size_t(t)];
      if (lt.state == Run::kDone)
        done.push_back(t);
      else
        by_site[size_t(lt.site)].push_back(t);
    }
    std::vector<std::string> groups;
    for (size_t s = 0; s < by_site.size(); ++s) {
      if (by_site[s].empty()) continue;
      const LogicalThread& first = threads_[size_t(by_site[s][0])];
      groups.push_back(threads_phrase(by_site[s]) + " at barrier " + std::to_string(first.barriers + 1) + " (" +
                       sites_[s].label + ", stage '" + stage_names_[first.stage] + "')");
    }
    if (groups.empty() || (groups.size() == 1 && done.empty())) return true;
    std::ostringstream msg;
    msg << "ssimkd emulated synccheck: barrier divergence in " << where() << ": ";
    for (size_t g = 0; g < groups.size(); ++g) msg << (g ? " while " : "") << groups[g];
    if (!done.empty())
      msg << " while " << threads_phrase(done) << " returned after " << threads_[size_t(done[0])].barriers
          << " barriers";
    error_ = msg.str();
    return false;
  }

  struct Site {
    const char* file;
    uint32_t line;
    std::string label;
  };

  Stacks stacks_;
  std::vector<LogicalThread> threads_;
  Fiber main_;
  BlockState state_{};
  std::vector<const char*> stage_names_;
  std::vector<Site> sites_;
  std::string planted_site_;
  std::unordered_map<const void*, GlobalTensor> tensors_;
  // the running launch
  std::string kernel_;
  int threads_count_ = 0;
  ThreadBody body_ = nullptr;
  const void* body_ctx_ = nullptr;
  int smem_elements_ = 0;
  std::vector<double> smem_;
  std::vector<Shadow> shadow_;
  int64_t block_ = 0;
  std::string error_;
  std::string uninitialised_read_;  // of the running interval, reported when it ends
};

thread_local std::unique_ptr<Runner> t_runner_storage;
thread_local Runner* t_runner = nullptr;  // set while a launch runs on this OS thread

Runner& running() {
  if (t_runner == nullptr) throw std::logic_error("ssimkd emulation: block code called outside an emulated launch");
  return *t_runner;
}

void thread_main(void* arg) {
  LogicalThread& t = *static_cast<LogicalThread*>(arg);
  Runner& r = *t.runner;
  try {
    r.body_(r.body_ctx_, cuda_detail::Thread{t.tid, r.threads_count_}, r.block_, r.smem_.data(), r.shadow_.data(),
            r.smem_elements_, &r.state_);
    if (g_planted.bug.load(std::memory_order_relaxed) == int(PlantedBug::kExtraBarrier) &&
        g_planted.value.load(std::memory_order_relaxed) == t.tid)
      sync();
    t.state = Run::kDone;
  } catch (const std::exception& e) {
    t.state = Run::kFailed;
    r.error_ = e.what();
  } catch (...) {  // nothing may unwind past a fiber's first frame
    t.state = Run::kFailed;
    r.error_ = "ssimkd emulation: an unknown exception in " + r.where();
  }
  fiber_switch(t.fiber, r.main_);
  std::abort();  // a finished fiber is never resumed
}

// Runs every block of a kernel whose thread body is body(th, block, SharedMemory<T>).
template <typename T, typename Body>
void run_kernel(const std::string& kernel, int64_t blocks, int smem_elements, const Body& body) {
  auto erased = [](const void* b, const cuda_detail::Thread& th, int64_t block, void* smem, Shadow* shadow, int size,
                   const BlockState* state) {
    (*static_cast<const Body*>(b))(th, block, SharedArena<T>{state, static_cast<T*>(smem), shadow, size});
  };
  running().run(kernel, blocks, cuda_detail::kThreads, smem_elements, sizeof(T), erased, &body);
}

// The launch's tensors for the global bounds checks, and the runner, for one launcher call.
class Launch {
 public:
  explicit Launch(const std::vector<TensorExtent>& tensors) {
    if (t_runner != nullptr) throw std::logic_error("ssimkd emulation: nested launch");
    if (!t_runner_storage) t_runner_storage = std::make_unique<Runner>();
    t_runner = t_runner_storage.get();
    t_runner->set_tensors(tensors);
  }
  ~Launch() {
    t_runner->clear_tensors();
    t_runner = nullptr;
  }
  Launch(const Launch&) = delete;
  Launch& operator=(const Launch&) = delete;
};

template <typename scalar_t>
const char* type_name() {
  if constexpr (std::is_same_v<scalar_t, float>)
    return "float";
  else if constexpr (std::is_same_v<scalar_t, double>)
    return "double";
  else if constexpr (std::is_same_v<scalar_t, c10::Half>)
    return "half";
  else
    return "bfloat16";
}

template <typename scalar_t>
std::string kernel_label(const char* kernel, int radius = 0) {
  return std::string(kernel) + "<" + type_name<scalar_t>() + (radius ? ", R=" + std::to_string(radius) : "") + ">";
}

std::string thread_context() {
  const Runner& r = running();
  return "thread " + std::to_string(r.state().tid) + " in stage '" + r.stage_name(r.state().stage) + "', " + r.where();
}

std::string offset_string(const GlobalTensor& t, int64_t offset) {
  int64_t last = 0;
  for (int d = 0; d < t.extent.dim; ++d) last += (t.extent.sizes[d] - 1) * t.extent.strides[d];
  return "element offset " + std::to_string(offset) + " (its elements lie between offsets 0 and " +
         std::to_string(last) + ")";
}

std::string shape_string(const TensorExtent& e) {
  std::ostringstream out;
  out << "(";
  for (int d = 0; d < e.dim; ++d) out << (d ? ", " : "") << e.sizes[d];
  out << ")";
  return out.str();
}

}  // namespace

// ---- cuda_emulator.h's entry points

void sync(std::source_location site) {
  running().wait_at_barrier(site);
}

void stage(const char* name) {
  running().set_stage(name);
}

int planted(PlantedBug bug) {
  return g_planted.bug.load(std::memory_order_relaxed) == int(bug) ? g_planted.value.load(std::memory_order_relaxed)
                                                                   : 0;
}

void report_shared_out_of_bounds(const char* buffer, int index, int size) {
  throw Violation("ssimkd emulated memcheck: " + std::string(buffer) + "[" + std::to_string(index) +
                  "] is outside the buffer (" + std::to_string(size) + " elements), " + thread_context());
}

void note_uninitialised_read(const char* buffer, int index) {
  running().note_uninitialised_read(buffer, index);
}

void report_race(const char* buffer, int index, Access mine, int other, uint8_t other_stage, Access theirs) {
  const Runner& r = running();
  const BlockState& s = r.state();
  std::ostringstream msg;
  msg << "ssimkd emulated racecheck: race on " << buffer << "[" << index << "] between ";
  if (other_stage == s.stage)
    msg << "threads " << other << " and " << s.tid << " in stage '" << r.stage_name(s.stage) << "'";
  else
    msg << "thread " << other << " in stage '" << r.stage_name(other_stage) << "' and thread " << s.tid << " in stage '"
        << r.stage_name(s.stage) << "'";
  msg << ": thread " << s.tid << (mine == Access::kWrite ? " writes" : " reads") << " it after thread " << other
      << (theirs == Access::kWrite ? " wrote" : " read") << " it with no barrier between, " << r.where();
  throw Violation(msg.str());
}

void report_bad_carve(const char* buffer, int begin, int end, int size) {
  throw Violation("ssimkd emulated memcheck: shared buffer " + std::string(buffer) + " [" + std::to_string(begin) +
                  ", " + std::to_string(end) + ") does not fit the block's " + std::to_string(size) + " elements, " +
                  thread_context());
}

const GlobalTensor* find_tensor(const void* data, int element_size) {
  if (data == nullptr) return nullptr;
  const GlobalTensor* t = running().find(data);
  if (t == nullptr)
    throw Violation("ssimkd emulated memcheck: a global pointer that is none of the launch's tensors, " +
                    thread_context());
  if (t->extent.element_size != element_size)
    throw Violation("ssimkd emulated memcheck: tensor " + t->label + " read as " + std::to_string(element_size) +
                    "-byte elements, it has " + std::to_string(t->extent.element_size) + ", " + thread_context());
  return t;
}

bool tensor_contains(const GlobalTensor& t, int64_t offset) {
  const TensorExtent& e = t.extent;
  for (int d = 0; d < e.dim; ++d)
    if (e.sizes[d] == 0) return false;
  if (offset < 0) return false;
  for (int k = 0; k < e.dim; ++k) {
    const int d = t.order[k];
    if (e.sizes[d] == 1 || e.strides[d] == 0) continue;
    const int64_t i = offset / e.strides[d];
    if (i >= e.sizes[d]) return false;
    offset -= i * e.strides[d];
  }
  return offset == 0;
}

int64_t tensor_size(const GlobalTensor& t, int dim) {
  return dim < t.extent.dim ? t.extent.sizes[dim] : 1;
}

void report_global_out_of_bounds(const GlobalTensor& t, int64_t offset) {
  throw Violation("ssimkd emulated memcheck: access outside tensor " + t.label + " " + shape_string(t.extent) + " at " +
                  offset_string(t, offset) + ", " + thread_context());
}

void report_null_access() {
  throw Violation("ssimkd emulated memcheck: access through a null global pointer, " + thread_context());
}

void report_plane_out_of_bounds(const GlobalTensor& t, int64_t plane, int64_t h, int64_t w) {
  const int64_t C = tensor_size(t, 1);
  std::ostringstream msg;
  msg << "ssimkd emulated memcheck: access outside tensor " << t.label << " " << shape_string(t.extent)
      << " at (n, c, h, w) = (" << plane / C << ", " << plane % C << ", " << h << ", " << w << "), "
      << thread_context();
  throw Violation(msg.str());
}

}  // namespace emu

// ------------------------------------------------------------------------------------------------
// The emulated launchers: the kernels of ssim_cuda.cu and minmax_cuda.cu, with their grids
// ------------------------------------------------------------------------------------------------

TileShape cuda_emulated_tile_shape(DType dtype) {
  const int side = cuda_detail::tile_side_for(dtype);
  return {side, side};
}

void ssim_fwd_cuda_emulated(const FusedArgs& args, const std::vector<TensorExtent>& tensors) {
  using namespace cuda_detail;
  if (args.total_tiles == 0) return;
  const emu::Launch launch(tensors);
  dtype_radius_switch(args.dtype, args.radius, [&]<typename scalar_t, int R>() {
    using T = AccType<scalar_t>;
    emu::run_kernel<T>(emu::kernel_label<scalar_t>("ssim_fwd_kernel", R), args.total_tiles,
                       int(tile_smem_bytes<T, R>(false) / int64_t(sizeof(T))),
                       [&](const Thread& th, int64_t block, SharedMemory<T> smem) {
                         forward_block<scalar_t, R>(th, args, block, smem);
                       });
    emu::run_kernel<SecondStageSum>(emu::kernel_label<T>("level_sum_kernel"), args.num_levels, 2 * kThreads,
                                    [&](const Thread& th, int64_t block, SharedMemory<SecondStageSum> smem) {
                                      level_sum_block<T>(th, args, int(block), carve(smem, 0, 2 * kThreads, "scratch"));
                                    });
  });
}

void ssim_bwd_cuda_emulated(const FusedArgs& args, const std::vector<TensorExtent>& tensors) {
  using namespace cuda_detail;
  if (args.total_tiles == 0) return;
  const emu::Launch launch(tensors);
  dtype_radius_switch(args.dtype, args.radius, [&]<typename scalar_t, int R>() {
    using T = AccType<scalar_t>;
    emu::run_kernel<T>(emu::kernel_label<scalar_t>("ssim_bwd_kernel", R), args.total_tiles,
                       int(tile_smem_bytes<T, R>(true) / int64_t(sizeof(T))),
                       [&](const Thread& th, int64_t block, SharedMemory<T> smem) {
                         backward_block<scalar_t, R>(th, args, block, smem);
                       });
    for (int l = 0; l < args.num_levels; ++l) {
      const LevelDesc& lv = args.levels[l];
      if (lv.g_x_affine == nullptr && lv.g_y_affine == nullptr) continue;
      emu::run_kernel<T>(
          emu::kernel_label<T>("plane_sum_kernel"), plane_sum_blocks(lv), 0,
          [&](const Thread& th, int64_t block, SharedMemory<T>) { plane_sum_thread<T>(th, args, l, block); });
    }
  });
}

void minmax_grad_cuda_emulated(const MinMaxGradArgs& args, const std::vector<TensorExtent>& tensors) {
  using namespace cuda_detail;
  if (args.N * args.C * args.H * args.W == 0) return;
  const emu::Launch launch(tensors);
  dtype_switch(args.dtype, [&]<typename scalar_t>() {
    // The count kernel's (chunk, plane) grid, flattened: block b is chunk b % chunks of plane b / chunks.
    const int64_t chunks = minmax_count_chunks(args);
    emu::run_kernel<float>(emu::kernel_label<scalar_t>("minmax_count_kernel"), args.N * args.C * chunks, 0,
                           [&](const Thread& th, int64_t block, SharedMemory<float>) {
                             minmax_count_thread<scalar_t>(th, args, block / chunks, block % chunks, chunks);
                           });
    const int64_t blocks = minmax_write_blocks(args);
    emu::run_kernel<float>(emu::kernel_label<scalar_t>("minmax_write_kernel"), blocks, 0,
                           [&](const Thread& th, int64_t block, SharedMemory<float>) {
                             minmax_write_thread<scalar_t>(th, args, block, blocks);
                           });
  });
}

void cuda_emulated_plant_bug(const std::string& bug, const std::string& site, int64_t value) {
  using emu::PlantedBug;
  static const std::pair<const char*, PlantedBug> kBugs[] = {{"none", PlantedBug::kNone},
                                                             {"drop_barrier", PlantedBug::kDropBarrier},
                                                             {"extra_barrier", PlantedBug::kExtraBarrier},
                                                             {"halo_rows", PlantedBug::kHaloRows},
                                                             {"last_column", PlantedBug::kLastColumn}};
  for (const auto& [name, code] : kBugs) {
    if (bug != name) continue;
    std::lock_guard<std::mutex> lock(emu::g_planted.mutex);
    emu::g_planted.site = site;
    emu::g_planted.value = int(value);
    emu::g_planted.bug = int(code);
    return;
  }
  TORCH_CHECK(false, "ssimkd: cuda_emulated_plant_bug: unknown bug '", bug,
              "' (none, drop_barrier, extra_barrier, halo_rows, last_column)");
}

std::vector<std::string> cuda_emulated_barrier_sites() {
  std::lock_guard<std::mutex> lock(emu::g_sites_mutex);
  return emu::g_sites;
}

}  // namespace ssimkd
