// Causal attention within each segment of a packed batch, fp32, on the CPU (forward and
// backward), with grouped-query attention: query head h reads KV head h / (N / G).
//
//   q, out, dout, dq [T, N, D]   k, v, dk, dv [T, G, D]   (C-contiguous)
//   cu [S + 1]  segment boundaries, cu[0] = 0, cu[S] = T, non-decreasing
//   lse [N, T]  per (head, token) log2 of the softmax normalizer of the scaled scores
//               (written by the forward, read by the backward)
//
// Cost: the sum over segments of L^2 / 2 (no work above the diagonal or across segments).
// Every output element is written by one task in a fixed order, so results do not depend
// on `threads`. Head dims: attention_supports_dim (8, 16, 32, 64, 96, 128, 256).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nova {

bool attention_supports_dim(int64_t D);

// The instruction-set builds this CPU can run, baseline first, best last. `isa` below: ""
// for the best, or one of these (the tests run each).
std::vector<std::string> attention_isas();

void packed_attention_fwd(const float* q, const float* k, const float* v, const int64_t* cu,
                          int64_t S, int64_t T, int64_t N, int64_t G, int64_t D, float scale,
                          float* out, float* lse, int threads,
                          const std::string& isa = "");

void packed_attention_bwd(const float* q, const float* k, const float* v, const float* out,
                          const float* lse, const float* dout, const int64_t* cu, int64_t S,
                          int64_t T, int64_t N, int64_t G, int64_t D, float scale, float* dq,
                          float* dk, float* dv, int threads,
                          const std::string& isa = "");

}  // namespace nova
