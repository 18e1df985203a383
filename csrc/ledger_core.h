// Resampler bookkeeping for spo_fast: counter-based RNG, pair selection, the pair ledger, epoch permutation and
// per-rank sharding. Plain C++17 with no Python or torch dependency; bindings.cpp exposes it as spo_fast._C.
//
// Every function here has a line-by-line twin in spo_fast/ledger.py (the pure-Python fallback). The two must stay
// bit-identical for the same inputs: change both together and bump kApiVersion (checked by spo_fast/_cpp_lib.py).
#pragma once

#include <cstdint>
#include <map>
#include <vector>

namespace spo_fast {

// Bumped whenever the semantics or the binding signatures change; a stale _C is then refused at load time.
constexpr int kApiVersion = 2;

// Domains separate the random streams so that, e.g., continuation draws never reuse permutation draws.
constexpr uint64_t kDomainContinuation = 1;
constexpr uint64_t kDomainPermutation = 2;

// splitmix64 finaliser (Steele, Lea, Flood 2014): a bijection on 64-bit words with full avalanche.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// Absorbs one counter word into the running key. Mixing the word on its own first keeps (a, b) and (a', b') with
// a ^ b == a' ^ b' from colliding.
inline uint64_t absorb(uint64_t h, uint64_t x) { return mix64(h ^ mix64(x + kGolden)); }

inline uint64_t key_root(int64_t seed, uint64_t domain) {
  return absorb(mix64(static_cast<uint64_t>(seed) + kGolden), domain);
}

// Uniform integer in [0, n) by the multiply-high method; the bias is below n / 2^64.
inline int64_t uniform_below(uint64_t h, uint64_t n) {
  return static_cast<int64_t>((static_cast<unsigned __int128>(h) * n) >> 64);
}

void continuation_indices(int64_t seed, int64_t pass_index, int64_t step, int64_t batch, int64_t k, int64_t* out);

void epoch_order(int64_t seed, int64_t epoch, int64_t n, int64_t* out);

// DistributedSampler's split: drop_remainder keeps the first n - n % world entries, otherwise the order is padded by
// wrapping around from its start to a multiple of world; rank r then takes entries r, r + world, r + 2 world, ...
std::vector<int64_t> shard(const int64_t* order, int64_t n, int64_t rank, int64_t world, bool drop_remainder);

// Returns the number of columns whose margin lies within `band` of `threshold` (left undecided: valid = 0 and
// margin = the precise value; the caller decides them with the reference arithmetic).
template <typename T>
int64_t select_columns(const T* scores, int64_t k, int64_t b, double threshold, double band, int64_t* win,
                       int64_t* lose, uint8_t* valid, float* margin, uint8_t* undecided);

struct TimestepStats {
  int64_t count = 0;     // prompt-steps scored at this timestep
  int64_t valid = 0;     // of which formed a valid pair
  int64_t nan = 0;       // of which had fewer than two finite scores
  double margin_sum = 0;  // sum of the margins of the valid pairs, accumulated in (pass, step, column) order
};

struct PassPairs {
  std::vector<int64_t> step_slot, column, win, lose, timestep, prompt_id, parent;
  std::vector<float> margin;
  int64_t num_invalid = 0, num_nan_prompts = 0;
};

// Storage for one sampling pass at a time plus the statistics over all passes.
class LedgerCore {
 public:
  void begin_pass(int64_t pass_index, const int64_t* prompt_ids, int64_t b);
  void record(int64_t step, int64_t timestep, const int64_t* win, const int64_t* lose, const uint8_t* valid,
              const float* margin, const int64_t* parent, int64_t b);
  // The sampler's per-step path in one call: select_columns + continuation_indices (keyed by this pass's index) +
  // record. The selection is written to the out arrays. It is recorded only when no column is undecided; otherwise
  // nothing is recorded, the count is returned, and the caller decides those columns and calls record() itself (so a
  // recorded valid/margin is always the final one).
  template <typename T>
  int64_t select_and_record(const T* scores, int64_t k, int64_t b, double threshold, double band, int64_t seed,
                            int64_t step, int64_t timestep, const int64_t* parent, int64_t* win, int64_t* lose,
                            uint8_t* valid, float* margin, int64_t* next, uint8_t* undecided);
  PassPairs end_pass();

  bool in_pass = false;
  int64_t pass_index = -1;
  int64_t batch = 0;
  std::vector<int64_t> prompt_ids;
  // One entry per record() call; the per-column vectors hold batch values per record, record-major.
  std::vector<int64_t> steps, timesteps;
  std::vector<int64_t> win, lose, parent;
  std::vector<uint8_t> valid;
  std::vector<float> margin;
  std::map<int64_t, TimestepStats> stats;
};

}  // namespace spo_fast
