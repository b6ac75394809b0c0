// pybind11 module nova_engine._C: the sequence packer (see packer.h); the n-gram index and
// the CPU packed attention bind themselves (decontam_bindings.cpp, attention_bindings.cpp).
// std::invalid_argument becomes ValueError. The GIL is released while packing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "packer.h"

namespace py = pybind11;

void bind_decontam(py::module_& m);   // decontam_bindings.cpp
void bind_attention(py::module_& m);  // attention_bindings.cpp

namespace {

// Hands a std::vector to numpy without a copy.
py::array_t<int64_t> to_numpy(std::vector<int64_t>&& v) {
  auto* owned = new std::vector<int64_t>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::array_t<int64_t>({static_cast<py::ssize_t>(owned->size())}, owned->data(),
                              free_when_done);
}

// lengths: [n] int64 (C-contiguous; other integer dtypes are rejected, not cast).
py::tuple pack(const py::array& lengths, int64_t capacity, const std::string& algorithm,
               int64_t max_seqs_per_bin) {
  if (lengths.ndim() != 1)
    throw std::invalid_argument("lengths must be 1-D, got " + std::to_string(lengths.ndim()) +
                                "-D");
  if (!py::isinstance<py::array_t<int64_t>>(lengths))
    throw std::invalid_argument("lengths must have dtype int64");
  auto arr = py::array_t<int64_t, py::array::c_style>::ensure(lengths);
  if (!arr) throw std::invalid_argument("lengths must be a contiguous int64 array");
  const nova::PackAlgorithm algo = nova::parse_algorithm(algorithm);
  const int64_t* data = arr.data();
  const int64_t n = static_cast<int64_t>(arr.shape(0));
  nova::PackResult result;
  {
    py::gil_scoped_release release;
    result = nova::pack(data, n, capacity, algo, max_seqs_per_bin);
  }
  return py::make_tuple(to_numpy(std::move(result.bin_offsets)), to_numpy(std::move(result.items)));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Nova Engine C++ extension: sequence packing, n-gram index, CPU packed attention.";
  m.def("pack", &pack, py::arg("lengths"), py::arg("capacity"), py::arg("algorithm"),
        py::arg("max_seqs_per_bin") = 0,
        "Packs lengths [n] int64 into bins of `capacity` tokens ('nextfit' | 'ffd' | 'bfd'; "
        "max_seqs_per_bin 0 = no cap). Returns (bin_offsets [num_bins+1], items [n]) int64: "
        "bin b holds items[bin_offsets[b]:bin_offsets[b+1]] in placement order.");
  bind_decontam(m);
  bind_attention(m);
}
