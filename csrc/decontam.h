// Exact word n-gram overlap of training items against evaluation items (decontamination).
//
// Text. The Python side (nova_engine/data/decontam.py) hands over each segment either as raw
// ASCII or, for any other text, NFKC-normalized and lowercased UTF-8. The tokenizer here does
// the rest: A-Z lowercased; deleted: ASCII punctuation (Python's string.punctuation) and the
// code points the caller lists as punctuation (Unicode category P*); word separators: ASCII
// whitespace (\t \n \v \f \r \x1c-\x1f, space) and the code points listed as whitespace;
// a NUL byte separates segments (chat turns), and no n-gram crosses it. Every other byte or
// code point belongs to a word (malformed UTF-8 bytes included, one byte at a time).
//
// Grams. A segment of m >= n words gives its word n-grams; a segment of 0 < m < n words gives
// one gram, the whole segment (m words). An eval item's gram set G(E) is the union over its
// segments, duplicates removed. A training item T "contains" a gram of k words when those k
// words appear contiguously in one of T's segments.
//   coverage(E, T) = |{g in G(E) : T contains g}| / |G(E)|
// T hits E when coverage(E, T) >= threshold, evaluated as the double division count / |G(E)|
// (as Python computes it), i.e. count >= need(E), need(E) = the least such count.
//
// Hashing (64-bit, collisions ignored): a word is hashed from its normalized bytes; a gram of
// k words w_i..w_{i+k-1} is H = sum_j w_{i+j} P^(k-1-j) mod 2^64 (from prefix sums), then
// mixed with k (grams of different lengths do not meet). Lookups go through a one-hash bit
// filter (~16 bits per eval gram, so ~2 MB for 10k eval items) before an open-addressed
// table, so the common miss costs one bit read; a training item's grams are hashed first and
// their filter words and table slots prefetched, so the random reads overlap.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace nova::decontam {

// Splits normalized text into word hashes (see above). Code points >= 2^17 are never listed
// (no punctuation or whitespace lives there).
class Tokenizer {
 public:
  static constexpr uint32_t kMaxListed = 1u << 17;
  // drop: code points deleted (>= 128); space: code points separating words (>= 128).
  Tokenizer(const std::vector<uint32_t>& drop, const std::vector<uint32_t>& space);

  // Hashes of the words of `text`; seg_ends[s] is the word index one past the end of
  // segment s (one entry per segment, empty segments included).
  void word_hashes(std::string_view text, std::vector<uint64_t>& words,
                   std::vector<int64_t>& seg_ends) const;

 private:
  // Class (kWord, kDrop, kSpace, kSegment) of the code point at p; *len = its bytes.
  uint8_t classify(const uint8_t* p, const uint8_t* end, int* len) const;

  std::vector<uint64_t> drop_bits_, space_bits_;
};

struct ScanResult {
  std::vector<int64_t> offsets;   // [n_items + 1]: item i's hits are [offsets[i], offsets[i+1])
  std::vector<int64_t> eval_ids;  // eval item hit, ascending per training item
  std::vector<int64_t> counts;    // its grams contained in the training item (>= need)
};

class NgramIndex {
 public:
  // n >= 1 words per gram; the tokenizer's non-ASCII punctuation and whitespace.
  NgramIndex(int64_t n, Tokenizer tokenizer);

  // Adds one eval item (its id is the number of items added before it). Not after build().
  int64_t add(std::string_view text);

  // Freezes the index for `threshold` in (0, 1]. Items without grams (no words) never hit.
  void build(double threshold);

  int64_t n() const { return n_; }
  int64_t size() const { return static_cast<int64_t>(gram_counts_.size()); }
  bool built() const { return built_; }
  const std::vector<int64_t>& gram_counts() const { return gram_counts_; }  // |G(E)| per item
  const std::vector<int64_t>& need() const { return need_; }                // after build()
  const std::vector<int64_t>& short_lengths() const { return short_lengths_; }  // m < n seen
  int64_t num_distinct_grams() const { return static_cast<int64_t>(keys_.size()); }
  const Tokenizer& tokenizer() const { return tokenizer_; }

  // The hits of each training item, in order. Const and self-contained: safe to call from
  // several threads at once, and without the GIL.
  ScanResult scan(const std::vector<std::string_view>& texts) const;

 private:
  int64_t find(uint64_t gram) const;  // index into keys_, or -1

  int64_t n_;
  Tokenizer tokenizer_;
  bool built_ = false;
  std::vector<int64_t> gram_counts_, need_, short_lengths_;
  std::vector<std::pair<uint64_t, int32_t>> pending_;  // (gram, eval id) until build()
  std::vector<uint64_t> keys_;                         // distinct grams, sorted
  std::vector<int64_t> post_offsets_;                  // [keys + 1] CSR into post_ids_
  std::vector<int32_t> post_ids_;                      // eval ids holding each gram
  std::vector<uint64_t> slot_keys_;                    // open addressing; 0 = empty
  std::vector<int32_t> slot_index_;                    // index into keys_
  std::vector<uint64_t> filter_;                       // one-hash bit filter
  uint64_t slot_mask_ = 0;
  int filter_shift_ = 64;
};

}  // namespace nova::decontam
