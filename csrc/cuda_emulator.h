// cuda_emulator.h: cuda_device.h's vocabulary for the host emulation of the CUDA kernels (tests only;
// compiled where SSIMKD_CUDA_EMULATION is defined, i.e. in ssim_cuda_emulated.cpp, which also holds
// the runner: fibers, the barrier, the reports).
//
// Every block runs as kThreads logical threads (cooperative fibers on the calling OS thread) that meet
// at every SSIMKD_SYNC(). What compute-sanitizer's tools would report on a GPU raises here:
//   racecheck  two threads touch one shared element between two barriers, at least one writing;
//   memcheck   a shared index outside its buffer, a global access outside its tensor;
//   initcheck  a shared element read before any thread of the block wrote it (and not written by
//              another thread in the same barrier interval: that is a race);
//   synccheck  threads of a block reaching different barriers, or different numbers of them.
// Shared memory carries a shadow per element (the barrier interval of its last accesses, who wrote,
// who read); a global access is checked against the extents ops.cpp passes for each tensor.
#pragma once

#include <atomic>
#include <cstdint>
#include <source_location>
#include <type_traits>

#include "ssim_params.h"

namespace ssimkd {
namespace emu {

// Shadow of one shared-memory element.
struct Shadow {
  uint32_t epoch;      // the barrier interval of the accesses below (0: none yet in this block)
  int16_t writer;      // the thread that wrote it in that interval, or -1
  int16_t readers[2];  // two distinct threads that read it in that interval, or -1
  uint8_t writer_stage, reader_stages[2];
  bool initialised;  // written by some thread of the block
};

// What the accessors need of the running block; the runner keeps it current.
struct BlockState {
  uint32_t epoch;  // barriers the block has passed, + 1
  int tid;         // the logical thread running now
  uint8_t stage;   // its stage (an index into the runner's table of SSIMKD_STAGE names)
};

enum class Access : int { kRead, kWrite };

[[noreturn]] void report_shared_out_of_bounds(const char* buffer, int index, int size);
// A read of an element no thread has written: reported when the interval ends, unless another thread
// writes it before that (then it is a race: the two threads' order is undefined).
void note_uninitialised_read(const char* buffer, int index);
[[noreturn]] void report_race(const char* buffer, int index, Access mine, int other, uint8_t other_stage,
                              Access theirs);

inline void on_shared_access(const BlockState& b, Shadow& s, const char* buffer, int index, Access access) {
  if (s.epoch != b.epoch) {  // the first access since the last barrier
    s.epoch = b.epoch;
    s.writer = s.readers[0] = s.readers[1] = -1;
  }
  if (access == Access::kRead) {
    if (!s.initialised) note_uninitialised_read(buffer, index);
    if (s.writer >= 0 && s.writer != b.tid)
      report_race(buffer, index, access, s.writer, s.writer_stage, Access::kWrite);
    if (s.readers[0] < 0) {
      s.readers[0] = int16_t(b.tid);
      s.reader_stages[0] = b.stage;
    } else if (s.readers[0] != b.tid && s.readers[1] < 0) {
      s.readers[1] = int16_t(b.tid);
      s.reader_stages[1] = b.stage;
    }
    return;
  }
  if (s.writer >= 0 && s.writer != b.tid) report_race(buffer, index, access, s.writer, s.writer_stage, Access::kWrite);
  for (int k = 0; k < 2; ++k) {  // two distinct readers: at least one of them is another thread
    if (s.readers[k] >= 0 && s.readers[k] != b.tid)
      report_race(buffer, index, access, s.readers[k], s.reader_stages[k], Access::kRead);
  }
  s.writer = int16_t(b.tid);
  s.writer_stage = b.stage;
  s.initialised = true;
}

// One element of a shared buffer: reads and writes go through the shadow.
template <typename T>
class SharedRef {
 public:
  using Value = std::remove_const_t<T>;
  SharedRef(const BlockState* block, T* data, Shadow* shadow, const char* buffer, int index)
      : block_(block), data_(data), shadow_(shadow), buffer_(buffer), index_(index) {}

  operator Value() const {
    on_shared_access(*block_, *shadow_, buffer_, index_, Access::kRead);
    return *data_;
  }
  const SharedRef& operator=(Value v) const {
    static_assert(!std::is_const_v<T>, "write through a read-only shared buffer");
    on_shared_access(*block_, *shadow_, buffer_, index_, Access::kWrite);
    *data_ = v;
    return *this;
  }
  const SharedRef& operator=(const SharedRef& other) const { return *this = Value(other); }
  const SharedRef& operator+=(Value v) const { return *this = Value(*this) + v; }
  const SharedRef& operator-=(Value v) const { return *this = Value(*this) - v; }

 private:
  const BlockState* block_;
  T* data_;
  Shadow* shadow_;
  const char* buffer_;
  int index_;
};

// A named buffer of a block's shared memory, or a position inside it (span + offset).
template <typename T>
class SharedSpan {
 public:
  SharedSpan(const BlockState* block, T* data, Shadow* shadow, const char* buffer, int size, int offset = 0)
      : block_(block), data_(data), shadow_(shadow), buffer_(buffer), size_(size), offset_(offset) {}
  template <typename U, typename = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  SharedSpan(const SharedSpan<U>& other)  // T -> const T
      : SharedSpan(other.block_, other.data_, other.shadow_, other.buffer_, other.size_, other.offset_) {}

  SharedRef<T> operator[](int i) const {
    const int index = offset_ + i;
    if (index < 0 || index >= size_) report_shared_out_of_bounds(buffer_, index, size_);
    return {block_, data_ + index, shadow_ + index, buffer_, index};
  }
  SharedSpan operator+(int d) const { return {block_, data_, shadow_, buffer_, size_, offset_ + d}; }

 private:
  template <typename U>
  friend class SharedSpan;
  const BlockState* block_;
  T* data_;  // the buffer's first element, and its shadow
  Shadow* shadow_;
  const char* buffer_;
  int size_, offset_;
};

// The block's shared memory as its kernel receives it.
template <typename T>
struct SharedArena {
  const BlockState* block;
  T* data;
  Shadow* shadow;
  int size;  // elements
};

[[noreturn]] void report_bad_carve(const char* buffer, int begin, int end, int size);

// A tensor of the running launch (ops.cpp describes each, TensorExtent), found by its data pointer.
struct GlobalTensor;
const GlobalTensor* find_tensor(const void* data, int element_size);  // null for null
bool tensor_contains(const GlobalTensor& t, int64_t offset);          // offset: elements from its data
int64_t tensor_size(const GlobalTensor& t, int dim);
[[noreturn]] void report_global_out_of_bounds(const GlobalTensor& t, int64_t offset);
[[noreturn]] void report_null_access();
[[noreturn]] void report_plane_out_of_bounds(const GlobalTensor& t, int64_t plane, int64_t h, int64_t w);

// A flat view of a tensor from `offset` elements on; every access checked against the tensor.
template <typename T>
class GlobalArray {
 public:
  GlobalArray() = default;
  GlobalArray(T* data, const GlobalTensor* tensor, int64_t offset) : data_(data), tensor_(tensor), offset_(offset) {}
  T& operator[](int64_t i) const {
    const int64_t at = offset_ + i;
    if (tensor_ == nullptr) report_null_access();
    if (!tensor_contains(*tensor_, at)) report_global_out_of_bounds(*tensor_, at);
    return data_[at];
  }
  GlobalArray operator+(int64_t d) const { return {data_, tensor_, offset_ + d}; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  T* data_ = nullptr;  // the tensor's data pointer
  const GlobalTensor* tensor_ = nullptr;
  int64_t offset_ = 0;
};

// Plane `plane` (= n * C + c) of an (N, C, H, W) tensor, addressed with the kernel's strides and
// checked against the tensor's own sizes: (h, w) inside the plane, the element inside the tensor.
template <typename T>
class GlobalPlane {
 public:
  GlobalPlane() = default;
  GlobalPlane(T* data, const GlobalTensor* tensor, int64_t plane, int64_t start, int64_t row, int64_t col)
      : data_(data), tensor_(tensor), plane_(plane), start_(start), row_(row), col_(col) {}
  T& operator()(int64_t h, int64_t w) const {
    if (tensor_ == nullptr) report_null_access();
    const int64_t at = start_ + h * row_ + w * col_;
    if (h < 0 || w < 0 || h >= tensor_size(*tensor_, 2) || w >= tensor_size(*tensor_, 3) || plane_ < 0 ||
        plane_ >= tensor_size(*tensor_, 0) * tensor_size(*tensor_, 1))
      report_plane_out_of_bounds(*tensor_, plane_, h, w);
    if (!tensor_contains(*tensor_, at)) report_global_out_of_bounds(*tensor_, at);
    return data_[at];
  }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  T* data_ = nullptr;
  const GlobalTensor* tensor_ = nullptr;
  int64_t plane_ = 0, start_ = 0, row_ = 0, col_ = 0;
};

// ---- barriers, stages and planted bugs

void sync(std::source_location site = std::source_location::current());
void stage(const char* name);

// Bugs that the tests plant at run time (ops: ssimkd::cuda_emulated_plant_bug), to show each is found.
enum class PlantedBug : int {
  kNone = 0,
  kDropBarrier,   // the barrier statement at one site (or every site) does nothing
  kExtraBarrier,  // thread `value` waits at one more barrier when its block function returns
  kHaloRows,      // the region load covers `value` rows more (or fewer) than the region
  kLastColumn,    // the backward's last stage runs `value` columns past the plane
};
int planted(PlantedBug bug);  // its value where planted, else 0

}  // namespace emu

namespace cuda_detail {

template <typename T>
using Shared = emu::SharedSpan<T>;
template <typename T>
using SharedMemory = emu::SharedArena<T>;
using emu::GlobalArray;
using emu::GlobalPlane;

template <typename T>
Shared<T> carve(const SharedMemory<T>& smem, int begin, int end, const char* name) {
  if (begin < 0 || end < begin || end > smem.size) emu::report_bad_carve(name, begin, end, smem.size);
  return {smem.block, smem.data + begin, smem.shadow + begin, name, end - begin};
}

template <typename T>
GlobalArray<T> global_array(const void* ptr) {
  const emu::GlobalTensor* t = emu::find_tensor(ptr, int(sizeof(T)));
  return {static_cast<T*>(const_cast<void*>(ptr)), t, 0};
}

template <typename T>
GlobalPlane<T> strided_plane(const void* ptr, const int64_t* stride, int64_t n, int64_t c) {
  const emu::GlobalTensor* t = emu::find_tensor(ptr, int(sizeof(T)));
  if (t == nullptr) return {};
  const int64_t N = emu::tensor_size(*t, 0), C = emu::tensor_size(*t, 1);
  const bool inside = n >= 0 && n < N && c >= 0 && c < C;
  return {static_cast<T*>(const_cast<void*>(ptr)), t,         inside ? n * C + c : N * C,
          n * stride[0] + c * stride[1],           stride[2], stride[3]};
}

template <typename T>
GlobalPlane<T> contiguous_plane(const void* ptr, int64_t plane, int64_t H, int64_t W) {
  const emu::GlobalTensor* t = emu::find_tensor(ptr, int(sizeof(T)));
  if (t == nullptr) return {};
  return {static_cast<T*>(const_cast<void*>(ptr)), t, plane, plane * H * W, W, 1};
}

// The logical threads of a block never run at once, but an atomic stays an atomic.
inline void atomic_add(const GlobalArray<unsigned long long>& at, unsigned long long value) {
  std::atomic_ref<unsigned long long>(at[0]).fetch_add(value, std::memory_order_relaxed);
}

}  // namespace cuda_detail
}  // namespace ssimkd

#define SSIMKD_DEVICE inline
#define SSIMKD_SYNC() ::ssimkd::emu::sync()
#define SSIMKD_STAGE(name) ::ssimkd::emu::stage(name)
#define SSIMKD_UNROLL
#define SSIMKD_PLANTED(bug) ::ssimkd::emu::planted(::ssimkd::emu::PlantedBug::bug)
