// pybind11 bindings of the n-gram decontamination index (decontam.h) into nova_engine._C.
// Texts are Python str (their UTF-8 is read in place); the GIL is released while hashing
// and scanning. std::invalid_argument becomes ValueError.
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "decontam.h"

namespace py = pybind11;
using nova::decontam::NgramIndex;
using nova::decontam::Tokenizer;

namespace {

template <typename T>
py::array_t<T> vec_to_numpy(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owned->size())}, owned->data(),
                        free_when_done);
}

// The bytes of every item of `texts` (str: its UTF-8, read in place; bytes: as is); `keep`
// holds references so the views stay valid while the GIL is released.
std::vector<std::string_view> utf8_views(const py::list& texts, std::vector<py::object>& keep) {
  std::vector<std::string_view> views;
  views.reserve(texts.size());
  keep.reserve(texts.size());
  for (size_t i = 0; i < texts.size(); ++i) {
    py::object item = texts[i];
    const char* data = nullptr;
    Py_ssize_t size = 0;
    if (PyUnicode_Check(item.ptr())) {
      data = PyUnicode_AsUTF8AndSize(item.ptr(), &size);
      if (data == nullptr) throw py::error_already_set();
    } else if (PyBytes_Check(item.ptr())) {
      data = PyBytes_AS_STRING(item.ptr());
      size = PyBytes_GET_SIZE(item.ptr());
    } else {
      throw py::type_error("texts[" + std::to_string(i) + "] must be str or bytes, got " +
                           std::string(Py_TYPE(item.ptr())->tp_name));
    }
    views.emplace_back(data, static_cast<size_t>(size));
    keep.push_back(std::move(item));
  }
  return views;
}

py::array_t<int64_t> copy_i64(const std::vector<int64_t>& v) {
  return vec_to_numpy(std::vector<int64_t>(v));
}

}  // namespace

void bind_decontam(py::module_& m) {
  py::class_<NgramIndex>(m, "NgramIndex",
                         "Exact word n-gram index of eval items (see csrc/decontam.h): add() "
                         "the eval texts, build(threshold), then scan() training texts.")
      .def(py::init([](int64_t n, const std::vector<uint32_t>& drop,
                       const std::vector<uint32_t>& space) {
             return NgramIndex(n, Tokenizer(drop, space));
           }),
           py::arg("n"), py::arg("drop"), py::arg("space"),
           "n words per gram; drop / space: the non-ASCII code points (< 2^17) deleted as "
           "punctuation / read as whitespace.")
      .def(
          "add",
          [](NgramIndex& self, const py::list& texts) {
            std::vector<py::object> keep;
            const auto views = utf8_views(texts, keep);
            py::gil_scoped_release release;
            for (const auto& v : views) self.add(v);
          },
          py::arg("texts"), "Adds eval items (str or UTF-8 bytes, NUL between segments) in order.")
      .def("build", &NgramIndex::build, py::arg("threshold"),
           "Freezes the index; an item is hit when count / gram_count >= threshold.")
      .def_property_readonly("n", &NgramIndex::n)
      .def_property_readonly("built", &NgramIndex::built)
      .def_property_readonly("num_distinct_grams", &NgramIndex::num_distinct_grams)
      .def("__len__", &NgramIndex::size)
      .def(
          "gram_counts", [](const NgramIndex& self) { return copy_i64(self.gram_counts()); },
          "[items] int64: distinct grams per eval item (0 for an item without words).")
      .def(
          "need", [](const NgramIndex& self) { return copy_i64(self.need()); },
          "[items] int64: least count that reaches the threshold (int64 max: never).")
      .def(
          "short_lengths", [](const NgramIndex& self) { return self.short_lengths(); },
          "Word counts m < n of eval segments used whole (sorted after build).")
      .def(
          "scan",
          [](const NgramIndex& self, const py::list& texts) {
            std::vector<py::object> keep;
            const auto views = utf8_views(texts, keep);
            nova::decontam::ScanResult r;
            {
              py::gil_scoped_release release;
              r = self.scan(views);
            }
            return py::make_tuple(vec_to_numpy(std::move(r.offsets)),
                                  vec_to_numpy(std::move(r.eval_ids)),
                                  vec_to_numpy(std::move(r.counts)));
          },
          py::arg("texts"),
          "Training texts [B] -> (offsets [B+1], eval_ids [M], counts [M]) int64: text i hits "
          "eval_ids[offsets[i]:offsets[i+1]] (ascending) with those gram counts.")
      .def(
          "word_hashes",
          [](const NgramIndex& self, const py::bytes& text) {
            std::vector<uint64_t> words;
            std::vector<int64_t> seg_ends;
            self.tokenizer().word_hashes(std::string_view(text), words, seg_ends);
            return py::make_tuple(vec_to_numpy(std::move(words)),
                                  vec_to_numpy(std::move(seg_ends)));
          },
          py::arg("text"),
          "(word hashes [W] uint64, segment ends [S] int64) of UTF-8 text (tests).");
}
