// pybind11 bindings of the CPU packed attention (attention.h) into nova_engine._C. Arrays
// are numpy views of torch tensors (zero-copy): float32 / int64, C-contiguous, checked here
// with messages that name the argument. The GIL is released while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(const py::array& a, const char* name, const std::vector<int64_t>& shape) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw std::invalid_argument(std::string(name) + ": wrong dtype");
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": must be C-contiguous");
  if (a.ndim() != static_cast<py::ssize_t>(shape.size()))
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(shape.size()) +
                                "-D, got " + std::to_string(a.ndim()) + "-D");
  for (size_t i = 0; i < shape.size(); ++i)
    if (a.shape(i) != shape[i])
      throw std::invalid_argument(std::string(name) + ": dim " + std::to_string(i) + " is " +
                                  std::to_string(a.shape(i)) + ", expected " +
                                  std::to_string(shape[i]));
  return static_cast<T*>(const_cast<void*>(a.data()));
}

struct Dims {
  int64_t T, N, G, D, S;
};

Dims dims(const py::array& q, const py::array& k, const py::array& cu) {
  if (q.ndim() != 3 || k.ndim() != 3 || cu.ndim() != 1)
    throw std::invalid_argument("q, k: [T, heads, D]; cu_seqlens: [S + 1]");
  return {q.shape(0), q.shape(1), k.shape(1), q.shape(2), cu.shape(0) - 1};
}

// q [T,N,D], k, v [T,G,D], cu [S+1] int64 -> writes out [T,N,D], lse [N,T]
void fwd(const py::array& q, const py::array& k, const py::array& v, const py::array& cu,
         float scale, const py::array& out, const py::array& lse, int threads,
         const std::string& isa) {
  const Dims d = dims(q, k, cu);
  const float* qp = ptr<float>(q, "q", {d.T, d.N, d.D});
  const float* kp = ptr<float>(k, "k", {d.T, d.G, d.D});
  const float* vp = ptr<float>(v, "v", {d.T, d.G, d.D});
  const int64_t* cp = ptr<int64_t>(cu, "cu_seqlens", {d.S + 1});
  float* op = ptr<float>(out, "out", {d.T, d.N, d.D});
  float* lp = ptr<float>(lse, "lse", {d.N, d.T});
  py::gil_scoped_release release;
  nova::packed_attention_fwd(qp, kp, vp, cp, d.S, d.T, d.N, d.G, d.D, scale, op, lp, threads,
                             isa);
}

// ... + out, lse (the forward's), dout [T,N,D] -> writes dq [T,N,D], dk, dv [T,G,D]
void bwd(const py::array& q, const py::array& k, const py::array& v, const py::array& out,
         const py::array& lse, const py::array& dout, const py::array& cu, float scale,
         const py::array& dq, const py::array& dk, const py::array& dv, int threads,
         const std::string& isa) {
  const Dims d = dims(q, k, cu);
  const float* qp = ptr<float>(q, "q", {d.T, d.N, d.D});
  const float* kp = ptr<float>(k, "k", {d.T, d.G, d.D});
  const float* vp = ptr<float>(v, "v", {d.T, d.G, d.D});
  const float* op = ptr<float>(out, "out", {d.T, d.N, d.D});
  const float* lp = ptr<float>(lse, "lse", {d.N, d.T});
  const float* gp = ptr<float>(dout, "dout", {d.T, d.N, d.D});
  const int64_t* cp = ptr<int64_t>(cu, "cu_seqlens", {d.S + 1});
  float* dqp = ptr<float>(dq, "dq", {d.T, d.N, d.D});
  float* dkp = ptr<float>(dk, "dk", {d.T, d.G, d.D});
  float* dvp = ptr<float>(dv, "dv", {d.T, d.G, d.D});
  py::gil_scoped_release release;
  nova::packed_attention_bwd(qp, kp, vp, op, lp, gp, cp, d.S, d.T, d.N, d.G, d.D, scale, dqp, dkp,
                             dvp, threads, isa);
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("attention_supports_dim", &nova::attention_supports_dim, py::arg("head_dim"));
  m.def("attention_isas", &nova::attention_isas,
        "The instruction-set builds of the CPU attention this CPU runs, best last.");
  m.def("packed_attention_fwd", &fwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("cu_seqlens"), py::arg("scale"), py::arg("out"), py::arg("lse"),
        py::arg("threads"), py::arg("isa") = "",
        "Causal attention per segment, fp32: q [T,N,D], k, v [T,G,D], cu_seqlens [S+1] int64 "
        "(0 .. T). Writes out [T,N,D] and lse [N,T] (log2 domain, for the backward).");
  m.def("packed_attention_bwd", &bwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("dout"), py::arg("cu_seqlens"), py::arg("scale"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("threads"), py::arg("isa") = "",
        "Backward of packed_attention_fwd: writes dq [T,N,D], dk, dv [T,G,D].");
}
