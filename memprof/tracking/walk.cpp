// The events backend's replay walk in C++: memprof/tracking/events.py's ``_Walk``, whose
// docstring says what it does; this one runs the same steps on the recorder's raw int64 triples
// without making a Python object per event.
//
// Most of a step's events are transient allocations (freed again before the next marker: an
// operator's scratch, every temporary of an optimizer step). The walk keeps them out of Python:
// it feeds them to the allocator's model (allocator_model.h) and keeps their running bytes, and
// returns to Python only for what the ledger must see: a marker, an allocation
// that is not a transient, a free of a storage the ledger holds, the first allocation after a
// marker (its phase), and a transient that makes a new peak (the live ones become entries).

#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "allocator_model.h"

namespace py = pybind11;
using memprof::Model;

namespace {

// What run() stopped at (events.py: EVENT, PHASE, PEAK, END).
constexpr int kEvent = 0;
constexpr int kPhase = 1;
constexpr int kPeak = 2;
constexpr int kEnd = 3;
constexpr int64_t kNode = -2;       // recorder.cpp's autograd node start
constexpr int64_t kSealed = -4;     // recorder.cpp's sealed marker
constexpr int64_t kNoNode = -2;     // run(): no autograd node started since the last return
constexpr uint8_t kTransient = 1;  // freed again before the next marker
constexpr uint8_t kFreedNext = 2;  // an allocation whose own free is the very next event

class Walk {
 public:
  Walk(const py::bytes& raw, py::dict entries, std::shared_ptr<Model> model)
      : entries_(std::move(entries)), model_(std::move(model)) {
    const std::string data = raw;
    events_.resize(data.size() / sizeof(int64_t));
    std::memcpy(events_.data(), data.data(), events_.size() * sizeof(int64_t));
    n_ = events_.size() / 3;
    flags_.assign(n_, 0);
    // As events.py's _flags: an allocation and its free, both before the next marker or node.
    std::unordered_map<int64_t, size_t> open;
    for (size_t i = 0; i < n_; ++i) {
      const int64_t ptr = events_[3 * i + 1];
      const int64_t value = events_[3 * i + 2];
      if (ptr < 0) {
        if (ptr != kSealed) {  // (a sealed marker is no marker yet: see recorder.cpp)
          open.clear();
        }
      } else if (value > 0) {
        open[ptr] = i;
        if (i + 1 < n_ && events_[3 * i + 4] == ptr && events_[3 * i + 5] == -value) {
          flags_[i] |= kFreedNext;
        }
      } else {
        auto found = open.find(ptr);
        if (found != open.end()) {
          flags_[found->second] |= kTransient;
          flags_[i] |= kTransient;
          open.erase(found);
        }
      }
    }
  }

  // Walk on until Python must act; returns (code, time, ptr, value, most, node, sealed):
  // ``most`` the most bytes the transients held after one of their allocations since the last
  // return (-1: none); ``node`` the last autograd node started since then (kNoNode: none; a
  // node start needs the phase set again) and ``sealed`` the sealed markers met since then
  // (None: none), which Python applies before anything else it is returned.
  py::tuple run(bool recording, bool logging, bool need_phase, int64_t threshold) {
    int64_t most = -1;
    node_ = kNoNode;
    sealed_.clear();
    while (pos_ < n_) {
      const size_t at = pos_;
      const int64_t when = events_[3 * at];
      const int64_t ptr = events_[3 * at + 1];
      const int64_t value = events_[3 * at + 2];
      if (ptr < 0) {
        ++pos_;
        if (ptr == kNode) {
          node_ = value;
          need_phase = true;
          continue;
        }
        if (ptr == kSealed) {
          sealed_.push_back(value);
          continue;
        }
        return result(kEvent, when, ptr, value, most);
      }
      if (value > 0) {
        if (!recording) {
          ++pos_;
          continue;
        }
        if (need_phase) {
          return result(kPhase, when, ptr, value, most);  // the same event comes again
        }
        if (!(flags_[at] & kTransient) || entries_.contains(py::int_(ptr))) {
          ++pos_;
          return result(kEvent, when, ptr, value, most);
        }
        add(ptr, value);
        bool paired = false;
        if (model_) {
          paired = (flags_[at] & kFreedNext) && !model_->contains(ptr);
          if (!paired) {
            model_->malloc(ptr, value);
          }
        }
        if (extra > most) {
          most = extra;
        }
        ++pos_;
        if (logging && extra > threshold) {
          pending_ = paired;
          pending_ptr_ = ptr;
          pending_value_ = value;
          return result(kPeak, when, ptr, value, most);
        }
        if (paired) {
          model_->malloc_free(value);
          served_ = ptr;
        }
        continue;
      }
      auto found = index_.find(ptr);
      if (found == index_.end()) {
        ++pos_;
        return result(kEvent, when, ptr, value, most);
      }
      const int64_t size = live_[found->second].second;
      live_[found->second].second = 0;  // gone (its slot stays: the order of the others)
      index_.erase(found);
      if (index_.empty()) {
        live_.clear();
      }
      extra -= size;
      if (ptr == served_) {
        served_ = 0;
      } else if (model_) {
        model_->free(ptr);
      }
      ++pos_;
    }
    return result(kEnd, 0, 0, 0, most);
  }

  // The live transients, in the order they were allocated, as (ptr, bytes); they leave the
  // walk (the ledger takes them as entries). A transient that stopped the walk at a peak
  // and was to be served at once goes to the model as a plain allocation first.
  py::list materialize() {
    if (pending_ && model_) {
      model_->malloc(pending_ptr_, pending_value_);
    }
    pending_ = false;
    py::list out;
    for (const auto& item : live_) {
      if (item.second != 0) {
        out.append(py::make_tuple(item.first, item.second));
      }
    }
    live_.clear();
    index_.clear();
    extra = 0;
    return out;
  }

  int64_t extra = 0;  // the bytes the live transients hold

 private:
  py::tuple result(int code, int64_t when, int64_t ptr, int64_t value, int64_t most) const {
    py::object sealed = py::none();
    if (!sealed_.empty()) {
      py::list items;
      for (const int64_t index : sealed_) {
        items.append(index);
      }
      sealed = items;
    }
    return py::make_tuple(code, when, ptr, value, most, node_, sealed);
  }

  void add(int64_t ptr, int64_t value) {
    auto found = index_.find(ptr);
    if (found != index_.end()) {
      live_[found->second].second = value;  // (a dict keeps the first insertion's place)
    } else {
      index_.emplace(ptr, live_.size());
      live_.emplace_back(ptr, value);
    }
    extra += value;
  }

  py::dict entries_;
  std::shared_ptr<Model> model_;
  std::vector<int64_t> events_;
  std::vector<uint8_t> flags_;
  size_t n_ = 0;
  size_t pos_ = 0;
  std::vector<std::pair<int64_t, int64_t>> live_;  // in allocation order; 0 bytes: freed
  std::unordered_map<int64_t, size_t> index_;      // ptr -> its slot in live_
  int64_t served_ = 0;
  int64_t node_ = kNoNode;       // run(): see there
  std::vector<int64_t> sealed_;  // run(): see there
  bool pending_ = false;
  int64_t pending_ptr_ = 0;
  int64_t pending_value_ = 0;
};

}  // namespace

void register_walk(py::module_& m) {
  py::class_<Walk>(m, "Walk", "The events replay's walk (memprof/tracking/walk.cpp)")
      .def(py::init<const py::bytes&, py::dict, std::shared_ptr<Model>>(), py::arg("raw"),
           py::arg("entries"), py::arg("model").none(true))
      .def("run", &Walk::run)
      .def("materialize", &Walk::materialize)
      .def_readonly("extra", &Walk::extra);
}
