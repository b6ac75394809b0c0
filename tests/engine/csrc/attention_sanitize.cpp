// Memory and UB check of the CPU packed attention (csrc/attention.cpp) under
// -fsanitize=address,undefined: every instruction-set build this CPU runs, every supported
// head dim, segments shorter than, equal to and spanning several blocks, GQA / MQA / MHA,
// 1 and 3 threads, forward then backward. Built and run by test_cpu_attention_sanitize.py.
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "attention.h"

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  const int dims[] = {8, 16, 32, 64, 96, 128, 256};
  const std::vector<std::vector<int64_t>> lengths = {{1}, {5, 40, 1, 77, 130}, {64, 65, 31, 33}, {200}};
  const int heads[][2] = {{4, 2}, {3, 1}, {2, 2}};
  int runs = 0;
  for (const auto& isa : nova::attention_isas())
    for (int D : dims)
      for (const auto& lens : lengths)
        for (const auto& h : heads) {
          std::vector<int64_t> cu = {0};
          for (int64_t l : lens) cu.push_back(cu.back() + l);
          const int64_t T = cu.back(), N = h[0], G = h[1], S = static_cast<int64_t>(lens.size());
          std::vector<float> q(T * N * D), k(T * G * D), v(T * G * D), dout(T * N * D);
          std::vector<float> out(T * N * D), lse(N * T), dq(T * N * D), dk(T * G * D), dv(T * G * D);
          for (auto* x : {&q, &k, &v, &dout})
            for (float& e : *x) e = normal(rng);
          for (int threads : {1, 3}) {
            nova::packed_attention_fwd(q.data(), k.data(), v.data(), cu.data(), S, T, N, G, D, 0.2f,
                                       out.data(), lse.data(), threads, isa);
            nova::packed_attention_bwd(q.data(), k.data(), v.data(), out.data(), lse.data(),
                                       dout.data(), cu.data(), S, T, N, G, D, 0.2f, dq.data(),
                                       dk.data(), dv.data(), threads, isa);
            ++runs;
          }
          for (auto* x : {&out, &dq, &dk, &dv})
            for (float e : *x)
              if (e != e) {
                std::printf("NaN: isa %s, head dim %d\n", isa.c_str(), D);
                return 1;
              }
        }
  std::printf("ok: %d runs\n", runs);
  return 0;
}
