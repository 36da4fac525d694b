// memprof's allocation recorder: every allocation and free PyTorch reports, in order, with a
// time, and nothing else.
//
// PyTorch's allocators (CPU and the CUDA caching allocator) report each allocation and free to
// the memory reporter found in the thread-local debug info under PROFILER_STATE; the PyTorch
// profiler installs itself there. The recorder installs itself there instead, so the program's
// allocations cost one locked append each, and no operator is recorded. Torch's own code reads
// that slot as a ProfilerStateBase (profilerEnabled()): the recorder is one, with a *disabled*
// config, so torch's checks see "no profiler running"; torch.profiler still refuses to start
// while the slot is taken ("Profiler is already enabled on this thread"), as it would under
// memprof's other event source, the PyTorch profiler itself.
//
// Besides allocations, the stream holds memprof's markers (``mark``: a Python hook's index,
// placed in time between the allocations) and the start of autograd nodes (a RecordFunction
// callback on the BACKWARD_FUNCTION scope only: backward has begun; the node's sequence number,
// which its forward op had, lets the replay name the forward source line of backward
// temporaries).
//
// Events are int64 triples (time_ns, ptr, value): an allocation (ptr > 0, value = +bytes), a
// free (ptr > 0, value = -bytes), a marker (-1, index), an autograd node (-2, its sequence
// number; consecutive ones are merged into one event holding the last one's number: the node
// running at the next allocation).

#include <ATen/record_function.h>
#include <c10/util/Logging.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/profiler/orchestration/observer.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

namespace py = pybind11;
using torch::profiler::impl::ActiveProfilerType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;
using torch::profiler::impl::ProfilerStateBase;

namespace {

constexpr int64_t kMarker = -1;
constexpr int64_t kNode = -2;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

class Recorder final : public ProfilerStateBase {
 public:
  Recorder()
      : ProfilerStateBase(ProfilerConfig(ProfilerState::Disabled, false, /*profile_memory=*/true)) {
  }

  void reportMemoryUsage(void* ptr, int64_t alloc_size, size_t, size_t, c10::Device) override {
    if (alloc_size != 0 && active.load(std::memory_order_relaxed)) {
      append(static_cast<int64_t>(reinterpret_cast<intptr_t>(ptr)), alloc_size);
    }
  }

  bool memoryProfilingEnabled() const override {
    return active.load(std::memory_order_relaxed);
  }

  ActiveProfilerType profilerType() override {
    return ActiveProfilerType::NONE;
  }

  void append(int64_t what, int64_t value) {
    const int64_t when = now_ns();
    std::lock_guard<std::mutex> guard(mutex_);
    if (what == kNode) {
      if (last_was_node_) {
        events_.back() = value;
        return;
      }
      last_was_node_ = true;
    } else {
      last_was_node_ = false;
    }
    events_.push_back(when);
    events_.push_back(what);
    events_.push_back(value);
  }

  // The events so far, as raw native int64s; the recorder starts empty again.
  py::bytes drain() {
    std::vector<int64_t> taken;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      taken.swap(events_);
      last_was_node_ = false;
    }
    const int64_t held = static_cast<int64_t>(taken.capacity() * sizeof(int64_t));
    if (held > high_water_bytes) {
      high_water_bytes = held;
    }
    return py::bytes(reinterpret_cast<const char*>(taken.data()), taken.size() * sizeof(int64_t));
  }

  // Events waiting to be drained.
  int64_t pending() {
    std::lock_guard<std::mutex> guard(mutex_);
    return static_cast<int64_t>(events_.size() / 3);
  }

  int64_t high_water_bytes = 0;  // the most the buffer held, as of the last drain
  std::atomic<bool> active{true};  // false once stopped, also where it could not be popped

 private:
  std::mutex mutex_;
  std::vector<int64_t> events_;
  bool last_was_node_ = false;
};

std::shared_ptr<Recorder> g_recorder;            // owned here while recording
// Stopped recorders are kept (empty, ~100 bytes each): a callback on another thread that read
// g_active just before stop() may still append to one.
std::vector<std::shared_ptr<Recorder>> g_retired;
int g_saved_log_level = 0;
std::atomic<Recorder*> g_active{nullptr};        // what the callbacks read, from any thread
at::CallbackHandle g_node_callback = 0;

std::unique_ptr<at::ObserverContext> on_node(const at::RecordFunction& fn) {
  if (Recorder* recorder = g_active.load(std::memory_order_acquire)) {
    recorder->append(kNode, fn.seqNr());
  }
  return nullptr;
}

bool installed_here() {
  return c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE) == g_recorder.get();
}

void start() {
  if (g_recorder) {
    throw std::runtime_error("memprof's recorder is already running");
  }
  if (c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE) != nullptr) {
    throw std::runtime_error(
        "another profiler (torch.profiler?) is running on this thread: stop it first");
  }
  // The CPU allocator logs a C++ warning ("Memory block of unknown size was allocated before
  // the profiling started...") when a block allocated before recording is freed: a normal
  // event for memprof (the ledger never knew that block), and no Python warning.
  g_saved_log_level = FLAGS_caffe2_log_level;
  if (FLAGS_caffe2_log_level < 2) {
    FLAGS_caffe2_log_level = 2;  // ERROR: raw C++ warnings are muted while recording
  }
  g_recorder = std::make_shared<Recorder>();
  c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE, g_recorder);
  g_active.store(g_recorder.get(), std::memory_order_release);
  g_node_callback = at::addGlobalCallback(
      at::RecordFunctionCallback(&on_node).scopes({at::RecordScope::BACKWARD_FUNCTION}));
}

// Stops recording; returns the events not drained yet.
py::bytes stop() {
  if (!g_recorder) {
    return py::bytes("");
  }
  if (g_node_callback != 0) {
    at::removeCallback(g_node_callback);
    g_node_callback = 0;
  }
  g_active.store(nullptr, std::memory_order_release);
  g_recorder->active.store(false, std::memory_order_relaxed);
  if (installed_here()) {
    c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE);
  }
  // else: something pushed its own state above the recorder and left it there; the recorder
  // stays below it, inert (g_active is null), until the thread's debug info lets it go.
  py::bytes rest = g_recorder->drain();
  g_retired.push_back(std::move(g_recorder));
  g_recorder.reset();
  FLAGS_caffe2_log_level = g_saved_log_level;
  return rest;
}

py::bytes drain() {
  if (!g_recorder) {
    return py::bytes("");
  }
  return g_recorder->drain();
}

void mark(int64_t index) {
  if (Recorder* recorder = g_active.load(std::memory_order_acquire)) {
    recorder->append(kMarker, index);
  }
}

int64_t pending() {
  return g_recorder ? g_recorder->pending() : 0;
}

int64_t high_water_bytes() {
  return g_recorder ? g_recorder->high_water_bytes : 0;
}

bool running() {
  return static_cast<bool>(g_recorder);
}

}  // namespace

// allocator_model.cpp: the caching allocator's model the replay feeds (built into this module).
void register_allocator_model(py::module_& m);
// walk.cpp: the events replay's walk over these events.
void register_walk(py::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "memprof's allocation recorder (see recorder.cpp)";
  register_allocator_model(m);
  register_walk(m);
  m.def("start", &start, "Start recording allocations on this thread (and autograd's).");
  m.def("stop", &stop, "Stop recording; returns the events not drained yet.");
  m.def("drain", &drain, "The events recorded since the last drain, as native int64 triples.");
  m.def("mark", &mark, "Append a marker event with this index.");
  m.def("pending", &pending, "Events recorded and not drained yet.");
  m.def("high_water_bytes", &high_water_bytes, "The most bytes the buffer held, so far.");
  m.def("running", &running, "Whether the recorder is recording.");
  m.def("now_ns", &now_ns, "The recorder's clock (steady_clock), in nanoseconds.");
}
