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
// running at the next allocation), a module's backward starting (-3, the module's index) and a
// sealed marker (-4, index: its calls wait for the next marker of either kind).
//
// The module backward starts come from C++ pre-hooks on the autograd node of each module's
// output (``watch_backward``), placed where memprof's Python grad_fn pre-hook used to mark the
// same moment, without calling Python in backward or a Python hook registration per module call.
// The first one of a backward queues the end-of-backward callback (``on_backward_end``). Each
// hook holds no tensor (only its node's address, to be taken off it) and is removed from its
// node when recording stops; one from an earlier recording never records.

#include <ATen/record_function.h>
#include <c10/util/Logging.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/node.h>
#include <torch/csrc/profiler/orchestration/observer.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <unordered_set>
#include <vector>

namespace py = pybind11;
using torch::profiler::impl::ActiveProfilerType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;
using torch::profiler::impl::ProfilerStateBase;

namespace {

constexpr int64_t kMarker = -1;
constexpr int64_t kNode = -2;
constexpr int64_t kModuleBackward = -3;
constexpr int64_t kSealed = -4;

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

// ------------------------------------------------------------ module backward hooks
std::atomic<int64_t> g_session{0};     // one per start(): older hooks stay silent
std::atomic<bool> g_live{false};       // the profiler records this step (not a skipped one)
std::atomic<bool> g_in_backward{false};  // the end-of-backward callback is queued
PyObject* g_on_backward_end = nullptr;  // what that callback calls (Python, under the GIL)

class ModuleBackwardHook;
std::recursive_mutex g_hooks_mutex;  // recursive: removing a hook from its node destroys it
std::unordered_set<ModuleBackwardHook*> g_hooks;  // the hooks alive, to remove at stop()

void backward_ended() {
  g_in_backward.store(false);
  pybind11::gil_scoped_acquire gil;
  if (g_on_backward_end != nullptr) {
    py::object callback = py::reinterpret_borrow<py::object>(g_on_backward_end);
    callback();
  }
}

class ModuleBackwardHook final : public torch::autograd::FunctionPreHook {
 public:
  ModuleBackwardHook(int64_t module, int64_t session, torch::autograd::Node* node)
      : module_(module), session_(session), node_(node) {
    std::lock_guard<std::recursive_mutex> guard(g_hooks_mutex);
    g_hooks.insert(this);
  }

  ~ModuleBackwardHook() override {
    std::lock_guard<std::recursive_mutex> guard(g_hooks_mutex);
    g_hooks.erase(this);
  }

  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& grads) override {
    Recorder* recorder = g_active.load(std::memory_order_acquire);
    if (recorder != nullptr && session_ == g_session.load() && g_live.load()) {
      if (!g_in_backward.exchange(true)) {
        torch::autograd::Engine::get_default_engine().queue_callback(&backward_ended);
      }
      recorder->append(kModuleBackward, module_);
    }
    return grads;
  }

  torch::autograd::Node* node() const {
    return node_;
  }

  // Compiled autograd asks each hook to describe itself for its graph, and the default
  // throws ("compiled_args nyi"), which ended the user's backward. This hook is left out of
  // the compiled graph: under compiled autograd no module's backward start is marked here
  // (the profiler uses Python hooks where it sees compiled autograd on at the forward).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) const override {}

 private:
  int64_t module_;
  int64_t session_;
  torch::autograd::Node* node_;
};

// Mark the start of module ``module``'s backward: a hook on the node that made ``output``.
void watch_backward(const at::Tensor& output, int64_t module) {
  if (!g_recorder) {
    return;
  }
  const auto& node = output.grad_fn();
  if (node) {
    node->add_pre_hook(std::make_unique<ModuleBackwardHook>(module, g_session.load(), node.get()));
  }
}

// Take every hook off its node (the hook holds no reference: a live hook's node is alive).
void remove_backward_hooks() {
  std::lock_guard<std::recursive_mutex> guard(g_hooks_mutex);
  const std::vector<ModuleBackwardHook*> hooks(g_hooks.begin(), g_hooks.end());
  for (ModuleBackwardHook* hook : hooks) {
    auto& pre_hooks = hook->node()->pre_hooks();
    pre_hooks.erase(std::remove_if(pre_hooks.begin(), pre_hooks.end(),
                                   [hook](const auto& item) { return item.get() == hook; }),
                    pre_hooks.end());
  }
  g_hooks.clear();
}

void set_live(bool live) {
  g_live.store(live);
}

// What the end-of-backward callback calls (None: nothing); held until stop().
void on_backward_end(py::object callback) {
  Py_XDECREF(g_on_backward_end);
  g_on_backward_end = nullptr;
  if (!callback.is_none()) {
    g_on_backward_end = callback.release().ptr();
  }
}

int64_t backward_hooks() {
  std::lock_guard<std::recursive_mutex> guard(g_hooks_mutex);
  return static_cast<int64_t>(g_hooks.size());
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
  g_session.fetch_add(1);
  g_in_backward.store(false);
  g_live.store(true);
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
  g_live.store(false);
  remove_backward_hooks();
  on_backward_end(py::none());
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

void seal(int64_t index) {
  if (Recorder* recorder = g_active.load(std::memory_order_acquire)) {
    recorder->append(kSealed, index);
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
  m.def("seal", &seal, "Append a sealed marker (its calls wait for the next marker).");
  m.def("watch_backward", &watch_backward,
        "Record module ``module``'s backward start: a pre-hook on ``output``'s grad_fn.");
  m.def("set_live", &set_live, "Whether the module backward hooks record (this step is).");
  m.def("on_backward_end", &on_backward_end,
        "The callable the end of a backward with a module in it calls (None: nothing).");
  m.def("backward_hooks", &backward_hooks, "How many module backward hooks are alive.");
  m.def("pending", &pending, "Events recorded and not drained yet.");
  m.def("high_water_bytes", &high_water_bytes, "The most bytes the buffer held, so far.");
  m.def("running", &running, "Whether the recorder is recording.");
  m.def("now_ns", &now_ns, "The recorder's clock (steady_clock), in nanoseconds.");
}
