// Exact word n-gram overlap (decontamination). See decontam.h.
#include "decontam.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace nova::decontam {
namespace {

// Classes of bytes and code points; kWord and kDrop ones make up a word (the kDrop ones are
// left out of it). kMulti: the lead byte of a multi-byte UTF-8 sequence.
enum ByteClass : uint8_t { kWord = 0, kDrop = 1, kSpace = 2, kSegment = 3, kMulti = 4 };

struct ByteTables {
  std::array<uint8_t, 256> cls{};
  std::array<uint8_t, 256> fix{};  // 1: the byte changes under normalization (drop, A-Z)
  std::array<char, 256> lower{};
  constexpr ByteTables() {
    for (int c = 0; c < 256; ++c) {
      cls[c] = kWord;
      lower[c] = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
      fix[c] = c >= 'A' && c <= 'Z';
    }
    // Python's str.isspace() on ASCII: \t \n \v \f \r, \x1c-\x1f, space.
    for (int c : {9, 10, 11, 12, 13, 0x1c, 0x1d, 0x1e, 0x1f, 32}) cls[c] = kSpace;
    // Python's string.punctuation.
    for (const char* p = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"; *p; ++p) {
      cls[static_cast<uint8_t>(*p)] = kDrop;
      fix[static_cast<uint8_t>(*p)] = 1;
    }
    cls[0] = kSegment;
    for (int c = 0xc0; c < 0xf8; ++c) cls[c] = kMulti;
  }
};

constexpr ByteTables kTables{};

constexpr const ByteTables& tables() { return kTables; }

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
constexpr uint64_t kPoly = 0xd6e8feb86659fd93ULL;  // odd: its powers are units mod 2^64

inline uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

inline uint64_t hash_word(const char* p, size_t len) {
  uint64_t h = 0x243f6a8885a308d3ULL ^ (len * kGolden);
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    h = (h ^ v) * 0xff51afd7ed558ccdULL;
    h ^= h >> 32;
  }
  const size_t r = len - i;  // the tail, read without a byte-wise copy (wyhash's trick):
  if (r >= 4) {                // two overlapping 4-byte reads, which with r fix every byte
    uint32_t a, b;
    std::memcpy(&a, p + i, 4);
    std::memcpy(&b, p + len - 4, 4);
    h = (h ^ ((uint64_t{a} << 32) | b)) * 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 29;
  } else if (r > 0) {
    const auto* q = reinterpret_cast<const uint8_t*>(p + i);
    const uint64_t v = (uint64_t{q[0]} << 16) | (uint64_t{q[r >> 1]} << 8) | q[r - 1];
    h = (h ^ v) * 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 29;
  }
  return mix64(h);
}

// Per-text scratch: word hashes, segment ends, prefix hashes.
struct Grams {
  std::vector<uint64_t> words, prefix, powers;
  std::vector<int64_t> seg_ends;

  const Tokenizer& tokenizer;

  Grams(int64_t max_k, const Tokenizer& tok) : powers(max_k + 1, 1), tokenizer(tok) {
    for (int64_t k = 1; k <= max_k; ++k) powers[k] = powers[k - 1] * kPoly;
  }

  void load(std::string_view text) {
    tokenizer.word_hashes(text, words, seg_ends);
    prefix.resize(words.size() + 1);
    prefix[0] = 0;
    for (size_t i = 0; i < words.size(); ++i) prefix[i + 1] = prefix[i] * kPoly + words[i];
  }

  // The gram of words [i, i + k).
  uint64_t gram(int64_t i, int64_t k) const {
    const uint64_t h = prefix[i + k] - prefix[i] * powers[k];
    const uint64_t g = mix64(h + static_cast<uint64_t>(k) * kGolden);
    return g == 0 ? 1 : g;  // 0 marks an empty slot
  }
};

int64_t need_for(int64_t count, double threshold) {
  if (count == 0) return std::numeric_limits<int64_t>::max();
  const double c = static_cast<double>(count);
  int64_t k = static_cast<int64_t>(std::ceil(threshold * c));
  k = std::clamp<int64_t>(k, 1, count);
  while (k > 1 && static_cast<double>(k - 1) / c >= threshold) --k;
  while (k < count && static_cast<double>(k) / c < threshold) ++k;
  return k;
}

uint64_t pow2_at_least(uint64_t x) {
  uint64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

}  // namespace

Tokenizer::Tokenizer(const std::vector<uint32_t>& drop, const std::vector<uint32_t>& space)
    : drop_bits_(kMaxListed / 64, 0), space_bits_(kMaxListed / 64, 0) {
  for (const auto* list : {&drop, &space}) {
    for (uint32_t cp : *list) {
      if (cp < 128 || cp >= kMaxListed)
        throw std::invalid_argument("listed code points must be in [128, 2^17), got " +
                                    std::to_string(cp));
      auto& bits = list == &drop ? drop_bits_ : space_bits_;
      bits[cp >> 6] |= uint64_t{1} << (cp & 63);
    }
  }
}

uint8_t Tokenizer::classify(const uint8_t* p, const uint8_t* end, int* len) const {
  const uint8_t c = tables().cls[*p];
  *len = 1;
  if (c != kMulti) return c;
  const uint8_t b = *p;
  const int n = b < 0xe0 ? 2 : b < 0xf0 ? 3 : 4;
  if (end - p < n) return kWord;
  uint32_t cp = b & (0x7f >> n);
  for (int i = 1; i < n; ++i) cp = (cp << 6) | (p[i] & 0x3f);
  *len = n;
  if (cp >= kMaxListed) return kWord;
  if ((drop_bits_[cp >> 6] >> (cp & 63)) & 1) return kDrop;
  if ((space_bits_[cp >> 6] >> (cp & 63)) & 1) return kSpace;
  return kWord;
}

void Tokenizer::word_hashes(std::string_view text, std::vector<uint64_t>& words,
                            std::vector<int64_t>& seg_ends) const {
  const ByteTables& t = tables();
  words.clear();
  seg_ends.clear();
  words.reserve(text.size() / 2 + 1);
  std::string buf;
  const auto* p = reinterpret_cast<const uint8_t*>(text.data());
  const uint8_t* const end = p + text.size();
  int len = 1;
  while (p < end) {
    const uint8_t c = classify(p, end, &len);
    if (c == kSpace) {
      p += len;
    } else if (c == kSegment) {
      seg_ends.push_back(static_cast<int64_t>(words.size()));
      ++p;
    } else {  // a word: hash it in place unless something in it changes under normalization
      const uint8_t* start = p;
      uint8_t fix = 0;
      while (p < end) {
        if (t.cls[*p] < kSpace) {  // ASCII word or punctuation byte: the common case
          fix |= t.fix[*p++];
          continue;
        }
        const uint8_t k = classify(p, end, &len);
        if (k >= kSpace) break;
        fix |= k == kDrop;
        p += len;
      }
      if (!fix) {
        words.push_back(hash_word(reinterpret_cast<const char*>(start), p - start));
        continue;
      }
      buf.clear();
      for (const uint8_t* q = start; q < p; q += len) {
        if (classify(q, p, &len) == kWord) {
          if (len == 1)
            buf.push_back(t.lower[*q]);
          else
            buf.append(reinterpret_cast<const char*>(q), len);
        }
      }
      if (!buf.empty()) words.push_back(hash_word(buf.data(), buf.size()));
    }
  }
  seg_ends.push_back(static_cast<int64_t>(words.size()));
}

NgramIndex::NgramIndex(int64_t n, Tokenizer tokenizer) : n_(n), tokenizer_(std::move(tokenizer)) {
  if (n < 1) throw std::invalid_argument("n must be >= 1, got " + std::to_string(n));
}

int64_t NgramIndex::add(std::string_view text) {
  if (built_) throw std::invalid_argument("add() after build(): the index is frozen");
  if (size() >= std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("too many eval items (limit 2^31 - 1)");
  const auto id = static_cast<int32_t>(size());
  Grams g(n_, tokenizer_);
  g.load(text);
  std::vector<uint64_t> grams;
  int64_t start = 0;
  for (int64_t end : g.seg_ends) {
    const int64_t m = end - start;
    if (m >= n_) {
      for (int64_t i = start; i + n_ <= end; ++i) grams.push_back(g.gram(i, n_));
    } else if (m > 0) {
      grams.push_back(g.gram(start, m));
      if (std::find(short_lengths_.begin(), short_lengths_.end(), m) == short_lengths_.end())
        short_lengths_.push_back(m);
    }
    start = end;
  }
  std::sort(grams.begin(), grams.end());
  grams.erase(std::unique(grams.begin(), grams.end()), grams.end());
  for (uint64_t x : grams) pending_.emplace_back(x, id);
  gram_counts_.push_back(static_cast<int64_t>(grams.size()));
  return id;
}

void NgramIndex::build(double threshold) {
  if (built_) throw std::invalid_argument("build() called twice");
  if (!(threshold > 0.0 && threshold <= 1.0))
    throw std::invalid_argument("threshold must be in (0, 1], got " + std::to_string(threshold));
  built_ = true;
  std::sort(short_lengths_.begin(), short_lengths_.end());
  need_.resize(gram_counts_.size());
  for (size_t e = 0; e < gram_counts_.size(); ++e) need_[e] = need_for(gram_counts_[e], threshold);

  std::sort(pending_.begin(), pending_.end());
  post_ids_.resize(pending_.size());
  post_offsets_.push_back(0);
  for (size_t p = 0; p < pending_.size(); ++p) {
    if (p > 0 && pending_[p].first != pending_[p - 1].first) {
      keys_.push_back(pending_[p - 1].first);
      post_offsets_.push_back(static_cast<int64_t>(p));
    }
    post_ids_[p] = pending_[p].second;
  }
  if (!pending_.empty()) {
    keys_.push_back(pending_.back().first);
    post_offsets_.push_back(static_cast<int64_t>(pending_.size()));
  }
  std::vector<std::pair<uint64_t, int32_t>>().swap(pending_);

  const uint64_t slots = pow2_at_least(std::max<uint64_t>(16, 2 * keys_.size()));
  slot_mask_ = slots - 1;
  slot_keys_.assign(slots, 0);
  slot_index_.assign(slots, -1);
  for (size_t i = 0; i < keys_.size(); ++i) {
    uint64_t s = keys_[i] & slot_mask_;
    while (slot_keys_[s] != 0) s = (s + 1) & slot_mask_;
    slot_keys_[s] = keys_[i];
    slot_index_[s] = static_cast<int32_t>(i);
  }
  const uint64_t bits = pow2_at_least(std::max<uint64_t>(64, 16 * keys_.size()));
  filter_shift_ = 64;
  for (uint64_t b = bits; b > 1; b >>= 1) --filter_shift_;
  filter_.assign(bits / 64, 0);
  for (uint64_t k : keys_) {
    const uint64_t b = k >> filter_shift_;
    filter_[b >> 6] |= uint64_t{1} << (b & 63);
  }
}

int64_t NgramIndex::find(uint64_t gram) const {
  const uint64_t b = gram >> filter_shift_;
  if (!((filter_[b >> 6] >> (b & 63)) & 1)) return -1;
  for (uint64_t s = gram & slot_mask_;; s = (s + 1) & slot_mask_) {
    const uint64_t k = slot_keys_[s];
    if (k == gram) return slot_index_[s];
    if (k == 0) return -1;
  }
}

ScanResult NgramIndex::scan(const std::vector<std::string_view>& texts) const {
  if (!built_) throw std::invalid_argument("scan() before build()");
  ScanResult r;
  r.offsets.reserve(texts.size() + 1);
  r.offsets.push_back(0);
  if (keys_.empty()) {
    r.offsets.resize(texts.size() + 1, 0);
    return r;
  }
  std::vector<int64_t> lengths = {n_};
  lengths.insert(lengths.end(), short_lengths_.begin(), short_lengths_.end());
  Grams g(n_, tokenizer_);
  std::vector<uint32_t> count(gram_counts_.size(), 0);
  std::vector<int32_t> hits, touched;
  std::vector<uint64_t> grams;
  for (const std::string_view text : texts) {
    g.load(text);
    // Three passes so the random reads overlap: every gram (prefetching its filter word),
    // the filter tests (prefetching the table slot of each pass), the table probes.
    grams.clear();
    int64_t start = 0;
    for (int64_t end : g.seg_ends) {
      for (int64_t k : lengths) {
        for (int64_t i = start; i + k <= end; ++i) {
          const uint64_t x = g.gram(i, k);
          __builtin_prefetch(&filter_[(x >> filter_shift_) >> 6]);
          grams.push_back(x);
        }
      }
      start = end;
    }
    size_t kept = 0;
    for (const uint64_t x : grams) {
      const uint64_t b = x >> filter_shift_;
      if ((filter_[b >> 6] >> (b & 63)) & 1) {
        __builtin_prefetch(&slot_keys_[x & slot_mask_]);
        grams[kept++] = x;
      }
    }
    hits.clear();
    for (size_t j = 0; j < kept; ++j) {
      const int64_t idx = find(grams[j]);
      if (idx >= 0) hits.push_back(static_cast<int32_t>(idx));
    }
    if (!hits.empty()) {
      std::sort(hits.begin(), hits.end());
      hits.erase(std::unique(hits.begin(), hits.end()), hits.end());
      for (int32_t idx : hits) {
        for (int64_t p = post_offsets_[idx]; p < post_offsets_[idx + 1]; ++p) {
          const int32_t e = post_ids_[p];
          if (count[e]++ == 0) touched.push_back(e);
        }
      }
      std::sort(touched.begin(), touched.end());
      for (int32_t e : touched) {
        if (static_cast<int64_t>(count[e]) >= need_[e]) {
          r.eval_ids.push_back(e);
          r.counts.push_back(count[e]);
        }
        count[e] = 0;
      }
      touched.clear();
    }
    r.offsets.push_back(static_cast<int64_t>(r.eval_ids.size()));
  }
  return r;
}

}  // namespace nova::decontam
