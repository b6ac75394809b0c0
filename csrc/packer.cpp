// Sequence packer: next-fit, first-fit decreasing, best-fit decreasing. See packer.h.
#include "packer.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <numeric>
#include <set>
#include <stdexcept>
#include <utility>

namespace nova {
namespace {

constexpr int64_t kNoRoom = std::numeric_limits<int64_t>::min();  // remaining of a bin full in count
// BFD uses the capacity-indexed structure up to this capacity, std::set above it.
constexpr int64_t kIndexedCapacityLimit = int64_t{1} << 18;

// Builds the CSR from per-item bin ids, keeping `order` (the placement order) inside each bin.
PackResult to_csr(const std::vector<int64_t>& bin_of, const std::vector<int64_t>& order,
                  int64_t num_bins) {
  PackResult r;
  r.bin_offsets.assign(num_bins + 1, 0);
  for (int64_t item : order) r.bin_offsets[bin_of[item] + 1]++;
  for (int64_t b = 0; b < num_bins; ++b) r.bin_offsets[b + 1] += r.bin_offsets[b];
  std::vector<int64_t> cursor(r.bin_offsets.begin(), r.bin_offsets.end() - 1);
  r.items.resize(order.size());
  for (int64_t item : order) r.items[cursor[bin_of[item]]++] = item;
  return r;
}

PackResult next_fit(const int64_t* len, int64_t n, int64_t capacity, int64_t cap_count) {
  std::vector<int64_t> bin_of(n), order(n);
  std::iota(order.begin(), order.end(), 0);
  int64_t num_bins = 0, remaining = -1, count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (num_bins == 0 || len[i] > remaining || (cap_count > 0 && count == cap_count)) {
      ++num_bins;
      remaining = capacity;
      count = 0;
    }
    bin_of[i] = num_bins - 1;
    remaining -= len[i];
    ++count;
  }
  return to_csr(bin_of, order, num_bins);
}

// Max segment tree over bins' remaining capacities. Leaves past the bins opened so far hold
// the full capacity, so "leftmost leaf with value >= len" is the first-fit bin, opening a new
// bin (the next leaf) when no open bin fits. At most n bins are ever needed.
PackResult first_fit_decreasing(const int64_t* len, int64_t n, int64_t capacity,
                                int64_t cap_count) {
  std::vector<int64_t> order = decreasing_order(len, n, capacity);
  int64_t leaves = 1;
  while (leaves < std::max<int64_t>(n, 1)) leaves <<= 1;
  std::vector<int64_t> tree(2 * leaves, kNoRoom);
  for (int64_t b = 0; b < n; ++b) tree[leaves + b] = capacity;
  for (int64_t v = leaves - 1; v >= 1; --v) tree[v] = std::max(tree[2 * v], tree[2 * v + 1]);
  std::vector<int64_t> count(cap_count > 0 ? n : 0, 0);
  std::vector<int64_t> bin_of(n);
  int64_t num_bins = 0;
  for (int64_t item : order) {
    const int64_t l = len[item];
    int64_t v = 1;
    while (v < leaves) v = tree[2 * v] >= l ? 2 * v : 2 * v + 1;
    const int64_t b = v - leaves;
    bin_of[item] = b;
    num_bins = std::max(num_bins, b + 1);
    tree[v] -= l;
    if (cap_count > 0 && ++count[b] == cap_count) tree[v] = kNoRoom;
    for (v >>= 1; v >= 1; v >>= 1) {
      const int64_t m = std::max(tree[2 * v], tree[2 * v + 1]);
      if (tree[v] == m) break;
      tree[v] = m;
    }
  }
  return to_csr(bin_of, order, num_bins);
}

// Set of integers in [0, size) with "smallest member >= x" in O(log64 size).
class HierarchicalBitset {
 public:
  explicit HierarchicalBitset(int64_t size) {
    int64_t bits = std::max<int64_t>(size, 1);
    do {
      const int64_t words = (bits + 63) / 64;
      levels_.emplace_back(words, 0);
      bits = words;
    } while (bits > 1);
  }
  void insert(int64_t x) {
    for (auto& level : levels_) {
      const bool was_empty = level[x >> 6] == 0;
      level[x >> 6] |= uint64_t{1} << (x & 63);
      if (!was_empty) return;
      x >>= 6;
    }
  }
  void erase(int64_t x) {
    for (auto& level : levels_) {
      level[x >> 6] &= ~(uint64_t{1} << (x & 63));
      if (level[x >> 6] != 0) return;
      x >>= 6;
    }
  }
  // Smallest member >= x, or -1.
  int64_t next(int64_t x) const { return next_at(0, x); }

 private:
  int64_t next_at(size_t lvl, int64_t x) const {
    const auto& level = levels_[lvl];
    const int64_t w = x >> 6;
    if (w >= static_cast<int64_t>(level.size())) return -1;
    const uint64_t bits = level[w] & (~uint64_t{0} << (x & 63));
    if (bits) return (w << 6) | __builtin_ctzll(bits);
    if (lvl + 1 == levels_.size()) return -1;
    int64_t word = next_at(lvl + 1, w + 1);  // next non-empty word at this level
    if (word < 0) return -1;
    return (word << 6) | __builtin_ctzll(level[word]);
  }
  std::vector<std::vector<uint64_t>> levels_;
};

PackResult best_fit_decreasing_indexed(const int64_t* len, int64_t n, int64_t capacity,
                                       int64_t cap_count) {
  std::vector<int64_t> order = decreasing_order(len, n, capacity);
  // by_room[r]: min-heap of the ids of open bins with remaining capacity r (and room in count).
  std::vector<std::vector<int64_t>> by_room(capacity + 1);
  HierarchicalBitset nonempty(capacity + 1);
  std::vector<int64_t> count(cap_count > 0 ? n : 0, 0);
  std::vector<int64_t> bin_of(n);
  const std::greater<int64_t> min_heap;
  int64_t num_bins = 0;
  for (int64_t item : order) {
    const int64_t l = len[item];
    const int64_t r = nonempty.next(l);
    int64_t b, room;
    if (r >= 0) {
      auto& heap = by_room[r];
      std::pop_heap(heap.begin(), heap.end(), min_heap);
      b = heap.back();
      heap.pop_back();
      if (heap.empty()) nonempty.erase(r);
      room = r - l;
    } else {
      b = num_bins++;
      room = capacity - l;
    }
    bin_of[item] = b;
    if (cap_count > 0 && ++count[b] == cap_count) continue;  // full in count: gone for good
    auto& heap = by_room[room];
    if (heap.empty()) nonempty.insert(room);
    heap.push_back(b);
    std::push_heap(heap.begin(), heap.end(), min_heap);
  }
  return to_csr(bin_of, order, num_bins);
}

PackResult best_fit_decreasing_set(const int64_t* len, int64_t n, int64_t capacity,
                                   int64_t cap_count) {
  std::vector<int64_t> order = decreasing_order(len, n, capacity);
  std::set<std::pair<int64_t, int64_t>> open;  // (remaining, bin id)
  std::vector<int64_t> count(cap_count > 0 ? n : 0, 0);
  std::vector<int64_t> bin_of(n);
  int64_t num_bins = 0;
  for (int64_t item : order) {
    const int64_t l = len[item];
    auto it = open.lower_bound({l, std::numeric_limits<int64_t>::min()});
    int64_t b, room;
    if (it != open.end()) {
      b = it->second;
      room = it->first - l;
      open.erase(it);
    } else {
      b = num_bins++;
      room = capacity - l;
    }
    bin_of[item] = b;
    if (cap_count > 0 && ++count[b] == cap_count) continue;
    open.emplace(room, b);
  }
  return to_csr(bin_of, order, num_bins);
}

}  // namespace

PackAlgorithm parse_algorithm(const std::string& name) {
  if (name == "nextfit") return PackAlgorithm::kNextFit;
  if (name == "ffd") return PackAlgorithm::kFirstFitDecreasing;
  if (name == "bfd") return PackAlgorithm::kBestFitDecreasing;
  throw std::invalid_argument("algorithm must be 'nextfit', 'ffd' or 'bfd', got '" + name + "'");
}

void check_pack_inputs(const int64_t* lengths, int64_t n, int64_t capacity,
                       int64_t max_seqs_per_bin) {
  if (capacity <= 0)
    throw std::invalid_argument("capacity must be > 0, got " + std::to_string(capacity));
  if (max_seqs_per_bin < 0)
    throw std::invalid_argument("max_seqs_per_bin must be >= 0 (0 = no cap), got " +
                                std::to_string(max_seqs_per_bin));
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 0)
      throw std::invalid_argument("length at index " + std::to_string(i) + " is negative (" +
                                  std::to_string(lengths[i]) + ")");
    if (lengths[i] > capacity)
      throw std::invalid_argument("length at index " + std::to_string(i) + " (" +
                                  std::to_string(lengths[i]) + ") exceeds the capacity " +
                                  std::to_string(capacity));
  }
}

std::vector<int64_t> decreasing_order(const int64_t* len, int64_t n, int64_t capacity) {
  std::vector<int64_t> order(n);
  if (capacity <= 4 * n + 65536) {
    // Counting sort by length, longest first; stable, so ties keep ascending index.
    std::vector<int64_t> start(capacity + 2, 0);
    for (int64_t i = 0; i < n; ++i) start[capacity - len[i] + 1]++;
    for (int64_t k = 0; k <= capacity; ++k) start[k + 1] += start[k];
    for (int64_t i = 0; i < n; ++i) order[start[capacity - len[i]]++] = i;
  } else {
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [len](int64_t a, int64_t b) {
      return len[a] != len[b] ? len[a] > len[b] : a < b;
    });
  }
  return order;
}

PackResult pack(const int64_t* lengths, int64_t n, int64_t capacity, PackAlgorithm algorithm,
                int64_t max_seqs_per_bin) {
  check_pack_inputs(lengths, n, capacity, max_seqs_per_bin);
  switch (algorithm) {
    case PackAlgorithm::kNextFit:
      return next_fit(lengths, n, capacity, max_seqs_per_bin);
    case PackAlgorithm::kFirstFitDecreasing:
      return first_fit_decreasing(lengths, n, capacity, max_seqs_per_bin);
    case PackAlgorithm::kBestFitDecreasing:
      return capacity <= kIndexedCapacityLimit
                 ? best_fit_decreasing_indexed(lengths, n, capacity, max_seqs_per_bin)
                 : best_fit_decreasing_set(lengths, n, capacity, max_seqs_per_bin);
  }
  throw std::invalid_argument("unknown packing algorithm");
}

}  // namespace nova
