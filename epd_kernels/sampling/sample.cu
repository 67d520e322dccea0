// sample: logits [B, V] fp32 -> one token id per row, the same function as epd_kernels/reference.py:sample.
//
// One block of 1024 threads per row; no workspace, no host sync, launch config fixed by B.
//
// The reference sorts probabilities in descending order (ties: lower index first), keeps the top_k,
// then the prefix whose mass before each token is < top_p, and walks the CDF of the kept prefix in
// that order with u = random_uniform(seed, step) * kept_mass. Every one of these steps is "find the
// token at position w of the sorted order", with w counted in tokens (top_k) or in probability mass
// (top_p, the draw). We answer each without sorting, by radix select on the fp32 bits of p (p in
// [0, 1], so the bits are < 2^30 and order like the values): three 10-bit digit levels, each one
// pass over the row that histograms (count, mass) of the tokens still matching the chosen prefix,
// then a block scan over the bins from the highest down. The level-1 histogram is shared by all
// selects. The token at the final key is the tie-th of that key's tokens in index order.
//
// Masses are fixed point, m = round(p * 2^52) as uint64 (split into two 32-bit shared atomics with an
// explicit carry), so every sum is exact and independent of the order of the atomics: a row's
// result depends only on that row's logits and parameters, never on its batch. p itself is computed
// as torch does (IEEE division by the temperature and by the sum, exp to ~1 ulp), so the kernel
// picks the reference's token except when u falls within float rounding of a CDF boundary.
//
// Passes over a sampled row: max, sum, level-1 histogram, 2 per select (top_k, top_p, draw).
// Greedy rows (temperature <= 0) take one pass. Non-finite logits give an in-range token, unspecified.
#include <cfloat>
#include <climits>

#include "epd_kernels/common.cuh"
#include "epd_kernels/sampling/params.h"
#include "epd_kernels/sampling/random.cuh"

namespace epd {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kDigitBits = 10;
constexpr int kBins = 1 << kDigitBits;  // one bin per thread in the scans
constexpr int kLevels = 3;              // 30 key bits
constexpr uint32_t kKeyMax = (1u << (kDigitBits * kLevels)) - 1;
constexpr float kMassScale = 4503599627370496.0f;  // 2^52
constexpr unsigned kFull = 0xffffffffu;
static_assert(kBins == kThreads, "scans give one bin to each thread");
static_assert(kWarps == 32, "second-level scans use one warp");

// Histogram of (count, fixed-point mass) per digit; mass = hi * 2^32 + lo.
struct Hist {
  uint32_t cnt[kBins];
  uint32_t lo[kBins];
  uint32_t hi[kBins];
};

struct Smem {
  Hist level1;            // all tokens by key bits [29:20], shared by every select of the row
  Hist level;             // levels 2 and 3 of the select in progress
  uint32_t first[kBins];  // level 3: lowest token index per bin (= per exact key)
  uint32_t scan_cnt[kWarps];
  uint64_t scan_mass[kWarps];
  float red_f[kWarps];
  float red_f_result;
  uint64_t red_u[kWarps];
  uint64_t red_u_result;
  float arg_val[kWarps];
  int arg_idx[kWarps];
  int arg_result;
  float arg_result_val;
  // Broadcast of a scan's crossing bin.
  int found;
  uint32_t bin, cnt_excl, cnt_own, first_own;
  uint64_t mass_excl, mass_own;
  int token;
};

// exp(d) for d <= 0 to ~1 ulp (--use_fast_math would turn expf into the ~2-ulp ex2.approx, and the
// probabilities should round as torch's do). Cody-Waite reduction and a degree-7 Taylor polynomial.
__device__ __forceinline__ float exp_accurate(float d) {
  if (d < -104.0f) return 0.0f;  // also -inf; NaN falls through and stays NaN
  const float n = rintf(d * 1.44269504088896341f);
  float r = fmaf(n, -6.93145751953125e-1f, d);
  r = fmaf(n, -1.42860682030941723e-6f, r);
  float e = 1.0f / 5040.0f;
  e = fmaf(e, r, 1.0f / 720.0f);
  e = fmaf(e, r, 1.0f / 120.0f);
  e = fmaf(e, r, 1.0f / 24.0f);
  e = fmaf(e, r, 1.0f / 6.0f);
  e = fmaf(e, r, 0.5f);
  e = fmaf(e, r, 1.0f);
  e = fmaf(e, r, 1.0f);
  const int ni = static_cast<int>(n);
  if (ni < -126) return 0.0f;  // denormal results are flushed anyway (ftz)
  return e * __int_as_float((ni + 127) << 23);
}

// argmax order: NaN first (as torch.argmax), then larger value, then lower index.
__device__ __forceinline__ bool arg_better(float v, int i, float bv, int bi) {
  const bool n = isnan(v), bn = isnan(bv);
  if (n != bn) return n;
  if (!n && v != bv) return v > bv;
  return i < bi;
}

// One row of logits and the softmax constants once they are known.
struct Row {
  const float* x;
  int vocab;
  bool vec;          // row start is 16-byte aligned: float4 loads for full groups
  bool unit_temp;    // temperature == 1: skip the division
  float temp;
  float zmax;        // max(x / temp)
  float sum;         // sum(exp(x / temp - zmax))

  // Token g*4 .. g*4+3 (missing ones read as 0). The element order within a thread is fixed by
  // the group index alone, so the vector and scalar paths reduce in the same order.
  __device__ __forceinline__ void load4(int g, float (&v)[4]) const {
    const int i0 = g * 4;
    if (vec && i0 + 3 < vocab) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(x) + g);
      v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = i0 + j < vocab ? __ldg(x + i0 + j) : 0.0f;
    }
  }

  __device__ __forceinline__ float scaled(float xi) const { return unit_temp ? xi : __fdiv_rn(xi, temp); }

  // softmax(x / temp)[i] as torch computes it: exp(z - max) / sum, NaN mapped to 0.
  __device__ __forceinline__ float prob(float xi) const {
    const float p = __fdiv_rn(exp_accurate(scaled(xi) - zmax), sum);
    return p >= 0.0f ? p : 0.0f;
  }
};

__device__ __forceinline__ uint32_t key_of(float p) { return min(__float_as_uint(p), kKeyMax); }
__device__ __forceinline__ uint64_t mass_of(float p) { return __float2ull_rn(p * kMassScale); }

// Calls f(index, logit) for every token of the row this thread owns, in increasing index order.
template <typename F>
__device__ __forceinline__ void for_each_logit(const Row& row, F&& f) {
  const int groups = (row.vocab + 3) / 4;
  for (int g = threadIdx.x; g < groups; g += kThreads) {
    float v[4];
    row.load4(g, v);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (g * 4 + j < row.vocab) f(g * 4 + j, v[j]);
  }
}

// Per-thread run of consecutive tokens in one bin, flushed with one set of atomics: rows with many
// equal probabilities (flat or masked logits) would otherwise serialise on a single bin.
struct BinRun {
  int bin = -1;
  uint32_t cnt = 0, first = 0;
  uint64_t mass = 0;

  __device__ __forceinline__ void add(Hist& h, uint32_t* first_arr, int b, uint64_t m, uint32_t index) {
    if (b != bin) {
      flush(h, first_arr);
      bin = b, cnt = 0, mass = 0, first = index;
    }
    cnt += 1;
    mass += m;
  }

  __device__ __forceinline__ void flush(Hist& h, uint32_t* first_arr) {
    if (bin < 0) return;
    atomicAdd(&h.cnt[bin], cnt);
    const uint32_t lo = static_cast<uint32_t>(mass);
    uint32_t hi = static_cast<uint32_t>(mass >> 32);
    if (lo != 0) {
      const uint32_t old = atomicAdd(&h.lo[bin], lo);
      hi += (old + lo < old) ? 1u : 0u;  // carry out of the low word
    }
    if (hi != 0) atomicAdd(&h.hi[bin], hi);
    if (first_arr != nullptr) atomicMin(&first_arr[bin], first);
    bin = -1;
  }
};

__device__ __forceinline__ void zero_hist(Hist& h, uint32_t* first_arr) {
  h.cnt[threadIdx.x] = 0, h.lo[threadIdx.x] = 0, h.hi[threadIdx.x] = 0;
  if (first_arr != nullptr) first_arr[threadIdx.x] = UINT_MAX;
}

// Inclusive scan of (c, m) over the block in thread order. Leaves the block totals in
// s.scan_cnt/scan_mass[kWarps - 1]; callers sync before the next scan.
__device__ __forceinline__ void block_inclusive_scan(uint32_t& c, uint64_t& m, Smem& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t c2 = __shfl_up_sync(kFull, c, o);
    const uint64_t m2 = __shfl_up_sync(kFull, m, o);
    if (lane >= o) c += c2, m += m2;
  }
  if (lane == 31) s.scan_cnt[warp] = c, s.scan_mass[warp] = m;
  __syncthreads();
  if (warp == 0) {
    uint32_t wc = s.scan_cnt[lane];
    uint64_t wm = s.scan_mass[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t c2 = __shfl_up_sync(kFull, wc, o);
      const uint64_t m2 = __shfl_up_sync(kFull, wm, o);
      if (lane >= o) wc += c2, wm += m2;
    }
    s.scan_cnt[lane] = wc, s.scan_mass[lane] = wm;
  }
  __syncthreads();
  if (warp > 0) c += s.scan_cnt[warp - 1], m += s.scan_mass[warp - 1];
}

__device__ __forceinline__ float block_sum(float v, Smem& s) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) s.red_f[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = warp_sum(s.red_f[threadIdx.x]);
    if (threadIdx.x == 0) s.red_f_result = v;
  }
  __syncthreads();
  return s.red_f_result;
}

__device__ __forceinline__ uint64_t block_sum(uint64_t v, Smem& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if ((threadIdx.x & 31) == 0) s.red_u[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = s.red_u[threadIdx.x];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    if (threadIdx.x == 0) s.red_u_result = v;
  }
  __syncthreads();
  return s.red_u_result;
}

// Block argmax (value and index of the winner under arg_better); every thread gets the result.
__device__ __forceinline__ int block_argmax(float& v, int i, Smem& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, v, o);
    const int oi = __shfl_xor_sync(kFull, i, o);
    if (arg_better(ov, oi, v, i)) v = ov, i = oi;
  }
  if ((threadIdx.x & 31) == 0) s.arg_val[threadIdx.x >> 5] = v, s.arg_idx[threadIdx.x >> 5] = i;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = s.arg_val[threadIdx.x], i = s.arg_idx[threadIdx.x];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFull, v, o);
      const int oi = __shfl_xor_sync(kFull, i, o);
      if (arg_better(ov, oi, v, i)) v = ov, i = oi;
    }
    if (threadIdx.x == 0) s.arg_result = i, s.arg_result_val = v;
  }
  __syncthreads();
  v = s.arg_result_val;
  return s.arg_result;
}

// Scan of one level's bins from the highest digit down. Finds the bin where the running weight
// (count or mass, excluding what lies above this level's prefix) crosses `want`: the bin with
// excl <= want < excl + own. Results land in s.found / s.bin / ...; ends with a barrier after
// every thread has read them.
struct LevelResult {
  bool found;
  uint32_t bin, cnt_excl, cnt_own, first_own;
  uint64_t mass_excl, mass_own;
};

__device__ __forceinline__ LevelResult scan_level(const Hist& h, const uint32_t* first_arr, bool by_mass,
                                                  uint64_t want, Smem& s) {
  if (threadIdx.x == 0) s.found = 0;
  const uint32_t b = kBins - 1 - threadIdx.x;
  const uint32_t c_own = h.cnt[b];
  const uint64_t m_own = (static_cast<uint64_t>(h.hi[b]) << 32) | h.lo[b];
  uint32_t c = c_own;
  uint64_t m = m_own;
  block_inclusive_scan(c, m, s);
  const uint64_t w_incl = by_mass ? m : c;
  const uint64_t w_excl = by_mass ? m - m_own : c - c_own;
  if (w_excl <= want && want < w_incl) {  // at most one bin: the weights are nondecreasing
    s.found = 1, s.bin = b, s.cnt_excl = c - c_own, s.cnt_own = c_own, s.mass_excl = m - m_own, s.mass_own = m_own;
    s.first_own = first_arr != nullptr ? first_arr[b] : 0u;
  }
  __syncthreads();
  const LevelResult r{s.found != 0, s.bin, s.cnt_excl, s.cnt_own, s.first_own, s.mass_excl, s.mass_own};
  __syncthreads();
  return r;
}

// The token at position `want` (0-based, in tokens or in fixed-point mass) of the descending order.
struct Cut {
  bool found;
  uint32_t key;      // fp32 bits of its probability
  uint32_t tie;      // it is the tie-th (0-based, by index) token with this key
  uint32_t cnt_gt;   // tokens with a larger key
  uint32_t first;    // lowest index with this key
  uint64_t mass_gt;  // mass of the tokens with a larger key
  uint64_t q;        // mass of one token with this key

  __device__ __forceinline__ uint32_t rank() const { return cnt_gt + tie; }
  __device__ __forceinline__ uint64_t mass_through() const { return mass_gt + (tie + 1ull) * q; }
};

__device__ Cut select(const Row& row, Smem& s, bool by_mass, uint64_t want) {
  Cut cut{};
  uint32_t prefix = 0;
  for (int level = 0; level < kLevels; ++level) {
    const int shift = kDigitBits * (kLevels - 1 - level);
    const bool last = level == kLevels - 1;
    if (level > 0) {
      zero_hist(s.level, last ? s.first : nullptr);
      __syncthreads();
      BinRun run;
      for_each_logit(row, [&](int i, float xi) {
        const float p = row.prob(xi);
        const uint32_t key = key_of(p);
        if ((key >> (shift + kDigitBits)) == prefix)
          run.add(s.level, last ? s.first : nullptr, (key >> shift) & (kBins - 1), mass_of(p), i);
      });
      run.flush(s.level, last ? s.first : nullptr);
      __syncthreads();
    }
    const uint64_t base = by_mass ? cut.mass_gt : cut.cnt_gt;
    const LevelResult r = scan_level(level == 0 ? s.level1 : s.level, last ? s.first : nullptr, by_mass,
                                     want - base, s);
    if (!r.found) return cut;  // want is past the row's total; uniform across the block
    prefix = (prefix << kDigitBits) | r.bin;
    cut.cnt_gt += r.cnt_excl;
    cut.mass_gt += r.mass_excl;
    if (last) {
      cut.found = true;
      cut.key = prefix;
      cut.first = r.first_own;
      cut.q = r.mass_own / r.cnt_own;  // every token in the bin has this exact key, hence this mass
      cut.tie = static_cast<uint32_t>(by_mass ? (want - cut.mass_gt) / cut.q : want - cut.cnt_gt);
    }
  }
  return cut;
}

// Index of the tie-th token (0-based, in index order) whose key is `key`; -1 if there is none.
__device__ int find_tie(const Row& row, Smem& s, uint32_t key, uint32_t tie) {
  if (threadIdx.x == 0) s.token = -1;
  const int groups = (row.vocab + 3) / 4;
  uint32_t seen = 0;
  for (int g0 = 0; g0 < groups; g0 += kThreads) {
    const int g = g0 + threadIdx.x;
    uint32_t match = 0;
    if (g < groups) {
      float v[4];
      row.load4(g, v);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (g * 4 + j < row.vocab && key_of(row.prob(v[j])) == key) match |= 1u << j;
    }
    const uint32_t own = __popc(match);
    uint32_t c = own;
    uint64_t unused = 0;
    block_inclusive_scan(c, unused, s);
    if (own != 0 && seen + c - own <= tie && tie < seen + c) {
      uint32_t skip = tie - (seen + c - own);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (match & (1u << j)) {
          if (skip == 0) s.token = g * 4 + j;
          skip -= 1;  // wraps once past the pick; no further writes
        }
      }
    }
    __syncthreads();
    const uint32_t total = s.scan_cnt[kWarps - 1];
    const int token = s.token;
    __syncthreads();
    seen += total;
    if (token >= 0) return token;
  }
  return -1;
}

__global__ void __launch_bounds__(kThreads, 1) sample_kernel(SampleParams p) {
  __shared__ Smem s;
  const int64_t r = blockIdx.x;
  Row row{};
  row.x = p.logits + r * p.logits_row_stride;
  row.vocab = static_cast<int>(p.vocab);
  row.vec = (reinterpret_cast<uintptr_t>(row.x) & 15) == 0;

  // Pass 1: max / argmax (the greedy answer; the softmax shift otherwise).
  float best_v = -INFINITY;
  int best_i = INT_MAX;
  for_each_logit(row, [&](int i, float xi) {
    if (arg_better(xi, i, best_v, best_i)) best_v = xi, best_i = i;
  });
  const int argmax = block_argmax(best_v, best_i, s);
  const float temperature = p.temperature[r];
  if (!(temperature > 0.0f)) {
    if (threadIdx.x == 0) p.out[r] = argmax;
    return;
  }

  // Pass 2: softmax denominator of x / T, T clamped as the reference does.
  row.temp = fmaxf(temperature, 1e-5f);
  row.unit_temp = row.temp == 1.0f;
  row.zmax = row.scaled(best_v);
  float local_sum = 0.0f;
  for_each_logit(row, [&](int, float xi) { local_sum += exp_accurate(row.scaled(xi) - row.zmax); });
  row.sum = block_sum(local_sum, s);

  // Pass 3: level-1 histogram of every token, and the total mass.
  zero_hist(s.level1, nullptr);
  __syncthreads();
  uint64_t local_mass = 0;
  {
    BinRun run;
    for_each_logit(row, [&](int i, float xi) {
      const float prob = row.prob(xi);
      const uint64_t m = mass_of(prob);
      local_mass += m;
      run.add(s.level1, nullptr, key_of(prob) >> (kDigitBits * (kLevels - 1)), m, i);
    });
    run.flush(s.level1, nullptr);
  }
  const uint64_t total_mass = block_sum(local_mass, s);  // its barriers also complete the histogram

  // The kept prefix: the first k tokens, cut further at the token whose mass before it reaches top_p.
  const uint32_t vocab = static_cast<uint32_t>(row.vocab);
  const int64_t top_k = p.top_k[r];
  const float top_p = p.top_p[r];
  const uint64_t k = !(top_p > 0.0f) ? 1 : (top_k > 0 && top_k < vocab ? static_cast<uint64_t>(top_k) : vocab);
  Cut cut{};
  bool keep_all = true;
  if (k < vocab) {
    cut = select(row, s, false, k - 1);
    keep_all = !cut.found;
  }
  if (top_p > 0.0f && top_p < 1.0f) {
    // mass_before < top_p  <=>  mass_before <= ceil(top_p * 2^52) - 1 in fixed point: the last kept
    // token is the one whose [mass_before, mass_before + m) holds that value.
    const Cut by_p = select(row, s, true, __float2ull_ru(top_p * kMassScale) - 1);
    if (by_p.found && (keep_all || by_p.rank() < cut.rank())) cut = by_p, keep_all = false;
  }
  const uint64_t kept_mass = keep_all ? total_mass : cut.mass_through();

  // The draw: u = uniform * kept mass in fp32 as the reference rounds it; the token whose
  // [cdf before, cdf) holds u, clamped to the last kept token.
  const float kept_f = __ull2float_rn(kept_mass) * (1.0f / kMassScale);
  const float u = __fmul_rn(random_uniform(p.seeds[r], p.steps[r]), kept_f);
  const uint64_t target = __float2ull_rd(u * kMassScale);
  Cut drawn{};
  if (target < kept_mass) drawn = select(row, s, true, target);
  if (!drawn.found) {
    if (keep_all) cut = select(row, s, false, vocab - 1);
    drawn = cut;
  }
  int token = argmax;
  if (drawn.found) token = drawn.tie == 0 ? static_cast<int>(drawn.first) : find_tie(row, s, drawn.key, drawn.tie);
  if (token < 0 || token >= row.vocab) token = argmax;
  if (threadIdx.x == 0) p.out[r] = token;
}

}  // namespace

void launch_sample(const SampleParams& p, cudaStream_t stream) {
  if (p.batch == 0) return;
  sample_kernel<<<static_cast<unsigned>(p.batch), kThreads, 0, stream>>>(p);
}

}  // namespace epd
