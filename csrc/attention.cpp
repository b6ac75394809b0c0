// Packed causal attention on the CPU (fp32), forward and backward: see attention.h for the
// contract and attention_impl.h for the algorithm. This file schedules the tasks over
// threads (OpenMP) and picks the instruction-set build: x86-64-v4 (AVX-512) or x86-64-v3
// (AVX2 + FMA) where the CPU has it, else the portable baseline.
#include "attention.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace nova {
namespace {

struct AttnArgs {
  const float* q;     // [T, N, D]
  const float* k;     // [T, G, D]
  const float* v;     // [T, G, D]
  const float* dout;  // [T, N, D] (backward)
  float* out;         // [T, N, D] (forward: written; backward: read)
  float* lse;         // [N, T] log2-domain log-sum-exp (forward: written; backward: read)
  float* dq;          // [T, N, D] (backward)
  float* dk;          // [T, G, D] (backward)
  float* dv;          // [T, G, D] (backward)
  int64_t T, N, G, D;
  float scale;
};

struct Task {
  int64_t start, len;       // the segment's rows
  int64_t g;                // KV head
  int64_t q_begin, q_end;   // query rows of the segment this task owns (multiples of BQ)
  double cost;
};

#define NOVA_VW 8
namespace generic {
#include "attention_impl.h"
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace v3 {
#include "attention_impl.h"
}  // namespace v3
#pragma GCC pop_options
#undef NOVA_VW
#define NOVA_VW 16
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace v4 {
#include "attention_impl.h"
}  // namespace v4
#pragma GCC pop_options
#define NOVA_HAVE_X86_BUILDS 1
#endif

using TaskFn = void (*)(const AttnArgs&, const Task&, std::vector<float>&);

// Instruction sets, each with its own build of attention_impl.h: 0 the baseline (SSE2 /
// NEON), 1 x86-64-v3 (AVX2 + FMA, 8-float vectors), 2 x86-64-v4 (AVX-512, 16-float vectors
// in the block products; head dims >= 16).
const char* const kIsaNames[] = {"baseline", "x86-64-v3", "x86-64-v4"};

int best_isa() {
#ifdef NOVA_HAVE_X86_BUILDS
  static const int isa = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
                             ? 2
                             : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0);
  return isa;
#else
  return 0;
#endif
}

template <int D>
TaskFn pick(bool backward, int isa) {
#ifdef NOVA_HAVE_X86_BUILDS
  if constexpr (D >= 16) {
    if (isa >= 2) return backward ? &v4::bwd_task<D> : &v4::fwd_task<D>;
  }
  if (isa >= 1) return backward ? &v3::bwd_task<D> : &v3::fwd_task<D>;
#endif
  return backward ? &generic::bwd_task<D> : &generic::fwd_task<D>;
}

TaskFn by_dim(int64_t D, bool backward, int isa) {
  switch (D) {
    case 8: return pick<8>(backward, isa);
    case 16: return pick<16>(backward, isa);
    case 32: return pick<32>(backward, isa);
    case 64: return pick<64>(backward, isa);
    case 96: return pick<96>(backward, isa);
    case 128: return pick<128>(backward, isa);
    case 256: return pick<256>(backward, isa);
    default: return nullptr;
  }
}

// "" = the best this CPU runs; otherwise one of attention_isas()
int resolve_isa(const std::string& name) {
  if (name.empty()) return best_isa();
  for (int i = 0; i <= best_isa(); ++i)
    if (name == kIsaNames[i]) return i;
  throw std::invalid_argument("packed attention: instruction set '" + name +
                              "' is not available on this CPU (best: " + kIsaNames[best_isa()] +
                              ")");
}

constexpr int64_t kBQ = generic::BQ;

// Tasks, most expensive first. The forward splits a segment's query blocks into chunks of
// roughly equal cost (rows i cost ~ i keys) so one long segment still fills the threads;
// the backward keeps a segment's (KV head's) keys in one task (dK, dV are summed over all
// of its queries).
std::vector<Task> make_tasks(const int64_t* cu, int64_t S, int64_t G, bool split, int threads) {
  std::vector<Task> tasks;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t a = cu[s], L = cu[s + 1] - cu[s];
    if (L <= 0) continue;
    const int64_t blocks = (L + kBQ - 1) / kBQ;
    int64_t chunks = split ? std::min<int64_t>(blocks, threads) : 1;
    for (int64_t g = 0; g < G; ++g) {
      int64_t b0 = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        // equal shares of the triangle: block b's cost ~ b + 1
        const double frac = std::sqrt(static_cast<double>(c + 1) / chunks);
        int64_t b1 = c + 1 == chunks ? blocks : static_cast<int64_t>(std::ceil(frac * blocks));
        b1 = std::max(b1, b0 + 1);
        if (b1 > blocks) b1 = blocks;
        if (b0 >= b1) continue;
        const int64_t q0 = b0 * kBQ, q1 = std::min(L, b1 * kBQ);
        const double cost = (static_cast<double>(q1) * q1 - static_cast<double>(q0) * q0) + 4096.0;
        tasks.push_back({a, L, g, q0, q1, cost});
        b0 = b1;
      }
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& x, const Task& y) { return x.cost > y.cost; });
  return tasks;
}

// One workspace per worker, kept between calls (calls are serialized by this mutex).
std::mutex g_mutex;
std::vector<std::vector<float>> g_workspaces;

// The tasks run on an OpenMP team. libgomp is shared with torch (same soname, loaded once
// per process), so this is torch's own intra-op team: its threads, still spinning after the
// op before, pick the work up at once. Threads of our own would compete with those
// spinning threads for the cores (measured: 2x slower right after a torch GEMM, 2 cores).
void run_tasks(const AttnArgs& args, const std::vector<Task>& tasks, TaskFn fn, int threads) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int n = std::max(1, std::min<int>(threads, static_cast<int>(tasks.size())));
  if (static_cast<int>(g_workspaces.size()) < n) g_workspaces.resize(n);
  std::atomic<size_t> next{0};
#pragma omp parallel num_threads(n)
  {
    const int w = omp_get_thread_num();
    for (size_t i = next++; i < tasks.size(); i = next++) fn(args, tasks[i], g_workspaces[w]);
  }
}

void check_shapes(int64_t T, int64_t N, int64_t G, int64_t D, const int64_t* cu, int64_t S) {
  if (T < 0 || N <= 0 || G <= 0 || N % G != 0)
    throw std::invalid_argument("packed attention: query heads " + std::to_string(N) +
                                " must be a positive multiple of KV heads " + std::to_string(G));
  if (!attention_supports_dim(D))
    throw std::invalid_argument("packed attention: head dim " + std::to_string(D) +
                                " is not one of 8, 16, 32, 64, 96, 128, 256");
  if (S < 1 || cu[0] != 0 || cu[S] != T)
    throw std::invalid_argument("packed attention: cu_seqlens must start at 0 and end at T = " +
                                std::to_string(T));
  for (int64_t s = 0; s < S; ++s)
    if (cu[s + 1] < cu[s])
      throw std::invalid_argument("packed attention: cu_seqlens must be non-decreasing");
}

}  // namespace

bool attention_supports_dim(int64_t D) { return by_dim(D, false, 0) != nullptr; }

std::vector<std::string> attention_isas() {
  return std::vector<std::string>(kIsaNames, kIsaNames + best_isa() + 1);
}

void packed_attention_fwd(const float* q, const float* k, const float* v, const int64_t* cu,
                          int64_t S, int64_t T, int64_t N, int64_t G, int64_t D, float scale,
                          float* out, float* lse, int threads, const std::string& isa) {
  check_shapes(T, N, G, D, cu, S);
  const TaskFn fn = by_dim(D, false, resolve_isa(isa));
  AttnArgs args{q, k, v, nullptr, out, lse, nullptr, nullptr, nullptr, T, N, G, D, scale};
  run_tasks(args, make_tasks(cu, S, G, true, threads), fn, threads);
}

void packed_attention_bwd(const float* q, const float* k, const float* v, const float* out,
                          const float* lse, const float* dout, const int64_t* cu, int64_t S,
                          int64_t T, int64_t N, int64_t G, int64_t D, float scale, float* dq,
                          float* dk, float* dv, int threads, const std::string& isa) {
  check_shapes(T, N, G, D, cu, S);
  const TaskFn fn = by_dim(D, true, resolve_isa(isa));
  AttnArgs args{q,  k,  v,  dout, const_cast<float*>(out), const_cast<float*>(lse),
                dq, dk, dv, T,    N,
                G,  D,  scale};
  run_tasks(args, make_tasks(cu, S, G, false, threads), fn, threads);
}

}  // namespace nova
