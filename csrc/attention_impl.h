// Causal attention within the segments of a packed batch, fp32, on the CPU: the body of
// csrc/attention.cpp, included there once per instruction set (x86-64-v4, x86-64-v3 and the
// portable baseline) inside a namespace of its own, with NOVA_VW set. No #include here: the
// includer provides everything.
//
// One task = (segment s, KV head g, a range of query blocks). The query heads that share
// KV head g (r = N / G of them, GQA) are stacked into one block of r * BQ rows, so every K/V
// block loaded is used r times. Scores are kept in the log2 domain (q pre-scaled by
// scale * log2(e)) and exponentiated with exp2_v8. Per (query block, key block):
//   forward   S = Q K^T, online softmax (row max m, row sum l), O += P V;
//             out = O / l, lse2 = m + log2(l)
//   backward  P = exp2(S - lse2), dV += P^T dO, dP = dO V^T, dS = P (dP - Delta),
//             dQ += scale dS K, dK += scale dS^T Q        (Delta = rowsum(dO * out))
// Key blocks past the diagonal are skipped; on the diagonal block P is set to 0 where the
// key comes after the query, so nothing outside a segment or in its future is ever read.

constexpr int BQ = 32;  // query rows per block (per head)
constexpr int BK = 64;  // keys per block
constexpr float LOG2E = 1.4426950408889634f;

// 8 floats, loaded from and stored to any float address (GCC vector extension: AVX on
// x86-64-v3, two SSE / NEON registers on the baseline), and 8 int32 lanes.
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));
#define LD(p) (*reinterpret_cast<const v8*>(p))
#define ST(p) (*reinterpret_cast<v8*>(p))

// 2^x lane by lane, for x <= 0 (scores minus their row max or log-sum-exp): 2^floor(x) by
// the exponent bits times a degree-6 minimax polynomial of 2^f on [0, 1) (max relative
// error 8.4e-8; c0 = 1, so 2^0 is exactly 1). x < -126 (masked keys are -inf) gives 0.
static inline __attribute__((always_inline)) v8 exp2_v8(v8 x) {
  const v8i zero = x < -126.0f;  // all ones where the result is 0
  x = x < -126.0f ? -126.0f : x;
  v8i n = __builtin_convertvector(x, v8i);  // truncates toward 0; x <= 0, so floor is n or n-1
  n += __builtin_convertvector(n, v8) > x;  // + (-1) where truncation rounded up
  const v8 f = x - __builtin_convertvector(n, v8);
  v8 p = f * 2.1702255e-4f + 1.2439688e-3f;
  p = p * f + 9.678841e-3f;
  p = p * f + 5.548334e-2f;
  p = p * f + 2.4022983e-1f;
  p = p * f + 6.931470e-1f;
  p = p * f + 1.0f;
  const v8i bits = ((v8i)p + (n << 23)) & ~zero;  // GCC vector casts keep the bits
  return (v8)bits;
}

// mask lanes (all ones = keep) of x; the others become `fill`
static inline __attribute__((always_inline)) v8 select(v8i keep, v8 x, float fill) {
  const v8 f = v8{} + fill;
  return keep ? x : f;
}

static inline __attribute__((always_inline)) float hmax(v8 x) {
  float m = x[0];
  for (int i = 1; i < 8; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

static inline __attribute__((always_inline)) float hsum(v8 x) {
  const float a = (x[0] + x[4]) + (x[1] + x[5]), b = (x[2] + x[6]) + (x[3] + x[7]);
  return a + b;
}

// lane j of block i: key index 8 * i + j within the key block
static inline __attribute__((always_inline)) v8i lane_index(int i) {
  const v8i base = {0, 1, 2, 3, 4, 5, 6, 7};
  return base + 8 * i;
}

// The block products below use vectors of VW floats (NOVA_VW, set by the includer: 8 for
// AVX2 / the baseline, 16 for AVX-512) and keep a tile of RT rows x CH columns of
// accumulators in registers (8 vectors), added to memory once per block (an accumulation
// over one block, then one add: a long sum over many blocks rounds like a blocked sum, not
// like one long running total).
constexpr int VW = NOVA_VW;
typedef float vw __attribute__((vector_size(4 * NOVA_VW), aligned(4)));
#define LDW(p) (*reinterpret_cast<const vw*>(p))
#define STW(p) (*reinterpret_cast<vw*>(p))

template <int CH, int RT>
struct Tile {
  static_assert(CH % VW == 0 && CH >= VW, "tile width must be a multiple of the vector width");
  vw acc[RT][CH / VW] = {};
  // acc[t] += s[t * s_stride] * b[0 .. CH)
  inline __attribute__((always_inline)) void fma(const float* s, int64_t s_stride,
                                                 const float* b) {
    for (int i = 0; i < CH / VW; ++i) {
      const vw bi = LDW(b + VW * i);
      for (int t = 0; t < RT; ++t) acc[t][i] += s[t * s_stride] * bi;
    }
  }
  inline __attribute__((always_inline)) void store(float* o, int64_t o_stride) const {
    for (int t = 0; t < RT; ++t)
      for (int i = 0; i < CH / VW; ++i) STW(o + t * o_stride + VW * i) = acc[t][i];
  }
  inline __attribute__((always_inline)) void add_to(float* o, int64_t o_stride) const {
    for (int t = 0; t < RT; ++t)
      for (int i = 0; i < CH / VW; ++i)
        STW(o + t * o_stride + VW * i) = LDW(o + t * o_stride + VW * i) + acc[t][i];
  }
};

// Columns per tile over a D-wide row: the widest multiple of VW, at most 4 * VW, that
// divides D (D = 96: 32 with 8-float vectors, 48 with 16); rows per tile so that a tile
// holds 8 to 12 vectors.
template <int D>
constexpr int tile_cols() {
  for (int c = 4 * VW; c > VW; c -= VW)
    if (D % c == 0) return c;
  return VW;
}
template <int D>
constexpr int tile_rows() {
  return tile_cols<D>() / VW >= 4 ? 2 : (tile_cols<D>() / VW >= 2 ? 4 : 8);
}

// C[R][BK] = A[R][D] * Bt[D][ld] (columns col0 .. col0 + BK of Bt). R a multiple of 2.
template <int D>
static inline __attribute__((always_inline)) void gemm_abt(const float* __restrict A, int R,
                                                           const float* __restrict Bt,
                                                           int64_t ld, int64_t col0,
                                                           float* __restrict C) {
  for (int r = 0; r < R; r += 2)
    for (int c = 0; c < BK; c += 4 * VW) {
      Tile<4 * VW, 2> t;
      for (int d = 0; d < D; ++d) t.fma(A + static_cast<int64_t>(r) * D + d, D, Bt + d * ld + col0 + c);
      t.store(C + static_cast<int64_t>(r) * BK + c, BK);
    }
}

// Out[R][D] += P[R][BK] * B[BK rows starting at row0][D]. R a multiple of 8.
template <int D>
static inline __attribute__((always_inline)) void gemm_ab_acc(const float* __restrict P, int R,
                                                              const float* __restrict B,
                                                              int64_t row0, float* __restrict Out) {
  constexpr int CH = tile_cols<D>(), RT = tile_rows<D>();
  static_assert(D % CH == 0, "tiles must cover the row exactly");
  for (int r = 0; r < R; r += RT)
    for (int c = 0; c < D; c += CH) {
      Tile<CH, RT> t;
      for (int j = 0; j < BK; ++j) t.fma(P + static_cast<int64_t>(r) * BK + j, BK, B + (row0 + j) * D + c);
      t.add_to(Out + static_cast<int64_t>(r) * D + c, D);
    }
}

// Out[BK rows starting at row0][D] += P[R][BK]^T * A[R][D].
template <int D>
static inline __attribute__((always_inline)) void gemm_atb_acc(const float* __restrict P, int R,
                                                               const float* __restrict A,
                                                               float* __restrict Out,
                                                               int64_t row0) {
  constexpr int CH = tile_cols<D>(), RT = tile_rows<D>();
  static_assert(D % CH == 0, "tiles must cover the row exactly");
  for (int j = 0; j < BK; j += RT)
    for (int c = 0; c < D; c += CH) {
      Tile<CH, RT> t;
      for (int r = 0; r < R; ++r) t.fma(P + static_cast<int64_t>(r) * BK + j, 1, A + static_cast<int64_t>(r) * D + c);
      t.add_to(Out + (row0 + j) * D + c, D);
    }
}

// Copies rows [s0, s0 + L) of head g of x [T][H][D] into dst: transposed [D][Lp] (trans) or
// [Lp][D]; rows L .. Lp are zero.
template <int D>
static void load_rows(const float* x, int64_t H, int64_t g, int64_t s0, int64_t L, int64_t Lp,
                      bool trans, float* dst) {
  if (trans) {
    for (int64_t j = 0; j < L; ++j) {
      const float* src = x + ((s0 + j) * H + g) * D;
      for (int d = 0; d < D; ++d) dst[d * Lp + j] = src[d];
    }
    for (int d = 0; d < D; ++d)
      for (int64_t j = L; j < Lp; ++j) dst[d * Lp + j] = 0.f;
  } else {
    for (int64_t j = 0; j < L; ++j) {
      const float* src = x + ((s0 + j) * H + g) * D;
      for (int d = 0; d < D; ++d) dst[j * D + d] = src[d];
    }
    for (int64_t j = L * D; j < Lp * D; ++j) dst[j] = 0.f;
  }
}

// Stacked rows of a query block: row hh * BQ + i is query s0 + i0 + i of head g * r + hh,
// times `mul`; rows past the segment are zero.
template <int D>
static void load_query_block(const float* x, int64_t N, int64_t r, int64_t g, int64_t s0,
                             int64_t i0, int64_t nq, float mul, float* dst) {
  for (int64_t hh = 0; hh < r; ++hh)
    for (int64_t i = 0; i < BQ; ++i) {
      float* row = dst + (hh * BQ + i) * D;
      if (i < nq) {
        const float* src = x + ((s0 + i0 + i) * N + g * r + hh) * D;
        for (int d = 0; d < D; ++d) row[d] = src[d] * mul;
      } else {
        for (int d = 0; d < D; ++d) row[d] = 0.f;
      }
    }
}

// Carves buffers of the given sizes (floats), each 64-byte aligned, out of a worker's
// workspace (grown, never shrunk: no allocation and no page faults once a worker has seen
// the largest task). With NOVA_ATTN_SEPARATE_BUFFERS (the sanitizer test) every buffer is
// an allocation of its own, so an access past one is caught.
struct Carve {
  static constexpr int64_t kAlign = 16;  // floats
  std::vector<float>& ws;
  std::vector<int64_t> offsets;
#ifdef NOVA_ATTN_SEPARATE_BUFFERS
  std::vector<std::vector<float>> own;
  Carve(std::vector<float>& w, std::initializer_list<int64_t> sizes) : ws(w) {
    for (int64_t x : sizes) own.emplace_back(x);
  }
  float* take(size_t i) { return own[i].data(); }
#else
  Carve(std::vector<float>& w, std::initializer_list<int64_t> sizes) : ws(w) {
    int64_t total = 0;
    for (int64_t x : sizes) {
      offsets.push_back(total);
      total += (x + kAlign - 1) / kAlign * kAlign;
    }
    if (static_cast<int64_t>(ws.size()) < total + kAlign) ws.resize(total + kAlign);
  }
  float* take(size_t i) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(ws.data());
    const uintptr_t aligned = (base + 4 * kAlign - 1) / (4 * kAlign) * (4 * kAlign);
    return reinterpret_cast<float*>(aligned) + offsets[i];
  }
#endif
};

template <int D>
static void fwd_task(const AttnArgs& a, const Task& t, std::vector<float>& ws) {
  // keys this task's queries can see: rows [0, q_end) of the segment
  const int64_t r = a.N / a.G, L = t.len, Lk = t.q_end, Lp = (Lk + BK - 1) / BK * BK;
  const int64_t R = r * BQ;
  Carve c(ws, {D * Lp, Lp * D, R * D, R * D, R * BK, R, R});
  float *kt = c.take(0), *vc = c.take(1), *qb = c.take(2), *ob = c.take(3), *s = c.take(4);
  float *m = c.take(5), *l = c.take(6);
  load_rows<D>(a.k, a.G, t.g, t.start, Lk, Lp, true, kt);
  load_rows<D>(a.v, a.G, t.g, t.start, Lk, Lp, false, vc);
  const float qmul = a.scale * LOG2E;
  for (int64_t i0 = t.q_begin; i0 < t.q_end; i0 += BQ) {
    const int64_t nq = std::min<int64_t>(BQ, L - i0);
    load_query_block<D>(a.q, a.N, r, t.g, t.start, i0, nq, qmul, qb);
    std::fill(m, m + R, -INFINITY);
    std::fill(l, l + R, 0.f);
    std::fill(ob, ob + R * D, 0.f);
    for (int64_t j0 = 0; j0 < i0 + nq; j0 += BK) {
      gemm_abt<D>(qb, static_cast<int>(R), kt, Lp, j0, s);
      const bool diag = j0 + BK - 1 > i0;
      for (int64_t row = 0; row < R; ++row) {
        float* sr = s + row * BK;
        const int32_t lim = static_cast<int32_t>(diag ? i0 + row % BQ - j0 : BK - 1);
        v8 x[BK / 8];
        v8 vmax = {};
        vmax += m[row];  // -inf before the first block
        for (int i = 0; i < BK / 8; ++i) {
          x[i] = diag ? select(lane_index(i) <= lim, LD(sr + 8 * i), -INFINITY) : LD(sr + 8 * i);
          vmax = x[i] > vmax ? x[i] : vmax;
        }
        const float mx = hmax(vmax);
        if (mx == -INFINITY) continue;  // no visible key yet (rows past the segment's end)
        v8 vsum = {};
        for (int i = 0; i < BK / 8; ++i) {
          const v8 p = exp2_v8(x[i] - mx);
          ST(sr + 8 * i) = p;
          vsum += p;
        }
        const float alpha = m[row] == -INFINITY ? 0.f : exp2_v8(v8{} + (m[row] - mx))[0];
        m[row] = mx;
        l[row] = l[row] * alpha + hsum(vsum);
        if (alpha != 1.f) {
          float* orow = ob + row * D;
          for (int d = 0; d < D; d += 8) ST(orow + d) = LD(orow + d) * alpha;
        }
      }
      gemm_ab_acc<D>(s, static_cast<int>(R), vc, j0, ob);
    }
    for (int64_t hh = 0; hh < r; ++hh)
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t row = hh * BQ + i, tok = t.start + i0 + i, h = t.g * r + hh;
        const float inv = 1.f / l[row];
        float* dst = a.out + (tok * a.N + h) * D;
        const float* src = ob + row * D;
        for (int d = 0; d < D; ++d) dst[d] = src[d] * inv;
        a.lse[h * a.T + tok] = m[row] + std::log2(l[row]);
      }
  }
}

template <int D>
static void bwd_task(const AttnArgs& a, const Task& t, std::vector<float>& ws) {
  const int64_t r = a.N / a.G, L = t.len, Lp = (L + BK - 1) / BK * BK, R = r * BQ;
  Carve c(ws, {D * Lp, D * Lp, Lp * D, Lp * D, Lp * D, R * D, R * D, R * D, R * D, R * BK,
               R * BK, R, R});
  float *kt = c.take(0), *vt = c.take(1), *kc = c.take(2), *dk = c.take(3), *dv = c.take(4);
  float *qs = c.take(5), *qr = c.take(6), *dob = c.take(7), *dqb = c.take(8), *p = c.take(9);
  float *dp = c.take(10), *lse = c.take(11), *delta = c.take(12);
  std::fill(dk, dk + Lp * D, 0.f);
  std::fill(dv, dv + Lp * D, 0.f);
  load_rows<D>(a.k, a.G, t.g, t.start, L, Lp, true, kt);
  load_rows<D>(a.k, a.G, t.g, t.start, L, Lp, false, kc);
  load_rows<D>(a.v, a.G, t.g, t.start, L, Lp, true, vt);
  for (int64_t i0 = t.q_begin; i0 < t.q_end; i0 += BQ) {
    const int64_t nq = std::min<int64_t>(BQ, L - i0);
    load_query_block<D>(a.q, a.N, r, t.g, t.start, i0, nq, 1.f, qr);
    load_query_block<D>(a.dout, a.N, r, t.g, t.start, i0, nq, 1.f, dob);
    const float qmul = a.scale * LOG2E;
    for (int64_t i = 0; i < R * D; ++i) qs[i] = qr[i] * qmul;
    for (int64_t hh = 0; hh < r; ++hh)
      for (int64_t i = 0; i < BQ; ++i) {
        const int64_t row = hh * BQ + i, h = t.g * r + hh, tok = t.start + i0 + i;
        if (i >= nq) {  // padding rows: P = 0 below (lse = +inf), dO = 0
          lse[row] = INFINITY;
          delta[row] = 0.f;
          continue;
        }
        lse[row] = a.lse[h * a.T + tok];
        const float* o = a.out + (tok * a.N + h) * D;
        const float* g = dob + row * D;
        float acc = 0.f;
        for (int d = 0; d < D; ++d) acc += o[d] * g[d];
        delta[row] = acc;
      }
    std::fill(dqb, dqb + R * D, 0.f);
    for (int64_t j0 = 0; j0 < i0 + nq; j0 += BK) {
      gemm_abt<D>(qs, static_cast<int>(R), kt, Lp, j0, p);
      gemm_abt<D>(dob, static_cast<int>(R), vt, Lp, j0, dp);
      const bool diag = j0 + BK - 1 > i0;
      for (int64_t row = 0; row < R; ++row) {
        float* pr = p + row * BK;
        float* dpr = dp + row * BK;
        const int32_t lim = static_cast<int32_t>(diag ? i0 + row % BQ - j0 : BK - 1);
        const float lr = lse[row], dl = delta[row];  // lr = +inf: a padding row, P = 0
        for (int i = 0; i < BK / 8; ++i) {
          v8 pj = exp2_v8(LD(pr + 8 * i) - lr);
          if (diag) pj = select(lane_index(i) <= lim, pj, 0.f);
          ST(pr + 8 * i) = pj;
          ST(dpr + 8 * i) = pj * (LD(dpr + 8 * i) - dl);  // dS
        }
      }
      gemm_atb_acc<D>(p, static_cast<int>(R), dob, dv, j0);
      gemm_atb_acc<D>(dp, static_cast<int>(R), qr, dk, j0);
      gemm_ab_acc<D>(dp, static_cast<int>(R), kc, j0, dqb);
    }
    for (int64_t hh = 0; hh < r; ++hh)
      for (int64_t i = 0; i < nq; ++i) {
        float* dst = a.dq + ((t.start + i0 + i) * a.N + t.g * r + hh) * D;
        const float* src = dqb + (hh * BQ + i) * D;
        for (int d = 0; d < D; ++d) dst[d] = src[d] * a.scale;
      }
  }
  for (int64_t j = 0; j < L; ++j) {
    float* k_dst = a.dk + ((t.start + j) * a.G + t.g) * D;
    float* v_dst = a.dv + ((t.start + j) * a.G + t.g) * D;
    for (int d = 0; d < D; ++d) {
      k_dst[d] = dk[j * D + d] * a.scale;
      v_dst[d] = dv[j * D + d];
    }
  }
}
