#include "ledger_core.h"

#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>

namespace spo_fast {

void continuation_indices(int64_t seed, int64_t pass_index, int64_t step, int64_t batch, int64_t k, int64_t* out) {
  const uint64_t prefix =
      absorb(absorb(key_root(seed, kDomainContinuation), static_cast<uint64_t>(pass_index)), static_cast<uint64_t>(step));
  for (int64_t c = 0; c < batch; ++c) out[c] = uniform_below(absorb(prefix, static_cast<uint64_t>(c)), k);
}

void epoch_order(int64_t seed, int64_t epoch, int64_t n, int64_t* out) {
  std::iota(out, out + n, int64_t{0});
  const uint64_t prefix = absorb(key_root(seed, kDomainPermutation), static_cast<uint64_t>(epoch));
  // Fisher-Yates from the top; draw i depends only on (seed, epoch, i), so the permutation is a pure function.
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = uniform_below(absorb(prefix, static_cast<uint64_t>(i)), static_cast<uint64_t>(i + 1));
    std::swap(out[i], out[j]);
  }
}

std::vector<int64_t> shard(const int64_t* order, int64_t n, int64_t rank, int64_t world, bool drop_remainder) {
  const int64_t per_rank = drop_remainder ? n / world : (n + world - 1) / world;
  std::vector<int64_t> out;
  if (n == 0) return out;
  out.reserve(per_rank);
  for (int64_t i = 0; i < per_rank; ++i) out.push_back(order[(rank + i * world) % n]);  // % n: the wrap-around pad
  return out;
}

template <typename T>
int64_t select_columns(const T* scores, int64_t k, int64_t b, double threshold, double band, int64_t* win,
                       int64_t* lose, uint8_t* valid, float* margin, uint8_t* undecided) {
  int64_t num_undecided = 0;
  for (int64_t c = 0; c < b; ++c) {
    // Same tie rules as a stable descending sort: the winner is the first of the best, the loser the last of the
    // worst; non-finite scores take part in neither (they sort as -inf for the winner and +inf for the loser).
    int64_t w = -1, l = -1, finite = 0;
    T best = 0, worst = 0;
    for (int64_t r = 0; r < k; ++r) {
      const T v = scores[r * b + c];
      if (!std::isfinite(v)) continue;
      ++finite;
      if (w < 0 || v > best) best = v, w = r;
      if (l < 0 || v <= worst) worst = v, l = r;
    }
    undecided[c] = 0;
    if (finite < 2) {
      win[c] = finite == 0 ? 0 : w;
      lose[c] = finite == 0 ? k - 1 : l;
      valid[c] = 0;
      margin[c] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    win[c] = w;
    lose[c] = l;
    // softmax([s_w, s_l])[0] - [1] == tanh((s_w - s_l) / 2), here in double: within ~1e-16 of the true value.
    const double m = std::tanh((static_cast<double>(best) - static_cast<double>(worst)) * 0.5);
    margin[c] = static_cast<float>(m);
    // torch's own float32 softmax is off by a few ulps; only a margin that close to the threshold can be decided
    // differently, so those few columns go back to the reference arithmetic.
    if (std::fabs(m - threshold) <= band) {
      undecided[c] = 1;
      valid[c] = 0;
      ++num_undecided;
    } else {
      valid[c] = m > threshold;
    }
  }
  return num_undecided;
}

template int64_t select_columns<float>(const float*, int64_t, int64_t, double, double, int64_t*, int64_t*, uint8_t*,
                                       float*, uint8_t*);
template int64_t select_columns<double>(const double*, int64_t, int64_t, double, double, int64_t*, int64_t*,
                                        uint8_t*, float*, uint8_t*);

void LedgerCore::begin_pass(int64_t pass_index_, const int64_t* ids, int64_t b) {
  in_pass = true;
  pass_index = pass_index_;
  batch = b;
  prompt_ids.assign(ids, ids + b);
  steps.clear();
  timesteps.clear();
  win.clear();
  lose.clear();
  parent.clear();
  valid.clear();
  margin.clear();
}

void LedgerCore::record(int64_t step, int64_t timestep, const int64_t* w, const int64_t* l, const uint8_t* v,
                        const float* m, const int64_t* p, int64_t b) {
  if (!in_pass) throw std::invalid_argument("record_step called outside a pass (call begin_pass first)");
  if (b != batch)
    throw std::invalid_argument("record_step got " + std::to_string(b) + " columns, the pass has " +
                                std::to_string(batch) + " prompts");
  steps.push_back(step);
  timesteps.push_back(timestep);
  win.insert(win.end(), w, w + b);
  lose.insert(lose.end(), l, l + b);
  valid.insert(valid.end(), v, v + b);
  margin.insert(margin.end(), m, m + b);
  parent.insert(parent.end(), p, p + b);
}

template <typename T>
int64_t LedgerCore::select_and_record(const T* scores, int64_t k, int64_t b, double threshold, double band,
                                      int64_t seed, int64_t step, int64_t timestep, const int64_t* parent,
                                      int64_t* w, int64_t* l, uint8_t* v, float* m, int64_t* next,
                                      uint8_t* undecided) {
  // Checked before selecting so that a bad call leaves no trace, as record() does.
  if (!in_pass) throw std::invalid_argument("record_step called outside a pass (call begin_pass first)");
  if (b != batch)
    throw std::invalid_argument("record_step got " + std::to_string(b) + " columns, the pass has " +
                                std::to_string(batch) + " prompts");
  const int64_t num_undecided = select_columns<T>(scores, k, b, threshold, band, w, l, v, m, undecided);
  continuation_indices(seed, pass_index, step, b, k, next);
  if (num_undecided == 0) record(step, timestep, w, l, v, m, parent, b);
  return num_undecided;
}

template int64_t LedgerCore::select_and_record<float>(const float*, int64_t, int64_t, double, double, int64_t, int64_t,
                                                      int64_t, const int64_t*, int64_t*, int64_t*, uint8_t*, float*,
                                                      int64_t*, uint8_t*);
template int64_t LedgerCore::select_and_record<double>(const double*, int64_t, int64_t, double, double, int64_t,
                                                       int64_t, int64_t, const int64_t*, int64_t*, int64_t*, uint8_t*,
                                                       float*, int64_t*, uint8_t*);

PassPairs LedgerCore::end_pass() {
  if (!in_pass) throw std::invalid_argument("end_pass called outside a pass (call begin_pass first)");
  PassPairs out;
  const int64_t slots = static_cast<int64_t>(steps.size());
  int64_t num_valid = 0;
  for (uint8_t v : valid) num_valid += v != 0;
  for (auto* vec : {&out.step_slot, &out.column, &out.win, &out.lose, &out.timestep, &out.prompt_id, &out.parent})
    vec->reserve(num_valid);
  out.margin.reserve(num_valid);
  for (int64_t s = 0; s < slots; ++s) {
    TimestepStats& st = stats[timesteps[s]];
    for (int64_t c = 0; c < batch; ++c) {
      const int64_t i = s * batch + c;
      const bool is_nan = std::isnan(margin[i]);
      st.count += 1;
      st.nan += is_nan;
      out.num_nan_prompts += is_nan;
      if (!valid[i]) {
        out.num_invalid += 1;
        continue;
      }
      st.valid += 1;
      st.margin_sum += static_cast<double>(margin[i]);
      out.step_slot.push_back(s);
      out.column.push_back(c);
      out.win.push_back(win[i]);
      out.lose.push_back(lose[i]);
      out.timestep.push_back(timesteps[s]);
      out.prompt_id.push_back(prompt_ids[c]);
      out.parent.push_back(parent[i]);
      out.margin.push_back(margin[i]);
    }
  }
  begin_pass(-1, nullptr, 0);
  in_pass = false;
  return out;
}

}  // namespace spo_fast
