// Sequence packing: bin packing of sequence lengths into bins of a fixed token capacity.
//
// Algorithms (all deterministic):
//   next-fit   items in arrival order; a new bin is opened when the current one cannot take
//              the item (the "greedy in arrival order" baseline).
//   FFD        first-fit decreasing: items sorted by length, longest first (ties: lower index
//              first); each goes into the lowest-numbered bin with room, else a new bin.
//              O(n log n) with a max segment tree over the bins' remaining capacities.
//   BFD        best-fit decreasing: same order; each goes into the bin with the least room
//              that still fits (ties: lowest-numbered bin), else a new bin. O(n log n) with a
//              capacity-indexed structure (hierarchical bitset over remaining capacity +
//              a min-heap of bin ids per remaining value; std::set for very large capacities).
// "Room" means remaining capacity >= length AND, when max_seqs_per_bin > 0, fewer than
// max_seqs_per_bin items in the bin (a bin full in count has remaining = -inf).
//
// Result (CSR): bin b holds items[bin_offsets[b] : bin_offsets[b+1]], in placement order
// (arrival order for next-fit, sorted order for FFD/BFD). Bins are numbered in the order they
// were opened. Every item appears exactly once.
//
// Errors (std::invalid_argument, i.e. ValueError in Python) name the offending index.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nova {

enum class PackAlgorithm { kNextFit, kFirstFitDecreasing, kBestFitDecreasing };

// Parses "nextfit" | "ffd" | "bfd"; throws std::invalid_argument otherwise.
PackAlgorithm parse_algorithm(const std::string& name);

struct PackResult {
  std::vector<int64_t> bin_offsets;  // [num_bins + 1]
  std::vector<int64_t> items;        // [n] item indices, grouped by bin
};

// Throws std::invalid_argument on capacity <= 0, max_seqs_per_bin < 0, or any length < 0 or
// > capacity (naming the first offending index). No Python objects are touched: safe to call
// without the GIL.
void check_pack_inputs(const int64_t* lengths, int64_t n, int64_t capacity,
                       int64_t max_seqs_per_bin);

// lengths: [n] int64 in [0, capacity]; max_seqs_per_bin: 0 = no cap.
PackResult pack(const int64_t* lengths, int64_t n, int64_t capacity, PackAlgorithm algorithm,
                int64_t max_seqs_per_bin);

// Items in the FFD/BFD placement order: length descending, ties by ascending index.
std::vector<int64_t> decreasing_order(const int64_t* lengths, int64_t n, int64_t capacity);

}  // namespace nova
