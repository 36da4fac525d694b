// The CUDA caching allocator's model of memprof/allocator.py (CachingAllocatorModel), in C++,
// for the replay of a profile: the same requests give the same figures, at a fraction of the
// Python model's cost per request (the replay feeds it every allocation of the run, twice: the
// run's options and the what-if).
//
// Only what a profile's replay uses is here: no capacity (the device never runs out, so no
// cache release, no garbage collection, no out-of-memory), one stream. Requests with a capacity
// or a memory fraction go to the Python model. Everything else follows the Python model line
// by line: rounding (512-byte blocks, roundup_power2_divisions), the small and large pools in
// (size, address) order, best fit with max_split_size_mb / max_non_split_rounding_mb, the
// growing tail of an expandable segment, splitting and merging, and the peak's figures.
// tests/test_allocator_native.py checks it against the Python model request by request.

#include "allocator_model.h"

namespace py = pybind11;
using memprof::Model;

void register_allocator_model(py::module_& m) {
  py::class_<Model, std::shared_ptr<Model>>(
      m, "AllocatorModel", "memprof.allocator.CachingAllocatorModel without a capacity, in C++")
      .def(py::init<bool, int64_t, int64_t, std::vector<int64_t>>(), py::arg("expandable"),
           py::arg("max_split"), py::arg("non_split_rounding"), py::arg("divisions"))
      .def("set_shadow", &Model::set_shadow, "Hand every request to this model too.")
      .def("malloc", &Model::malloc, "Serve a request of nbytes under key.")
      .def("free", &Model::free, "Return key's block (unknown keys are ignored).")
      .def("malloc_free", &Model::malloc_free, "A request freed again before any other.")
      .def("__contains__", &Model::contains, "Whether key is allocated.")
      .def("figures", &Model::figures, "The figures of a Replay, by name.")
      .def_readonly("reserved", &Model::reserved)
      .def_readonly("allocated", &Model::allocated);
}
