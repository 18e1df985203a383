// pybind11 bindings of ledger_core over numpy arrays (no torch headers: the build depends only on pybind11 and a
// C++17 compiler). spo_fast/ledger.py hands tensors over as zero-copy numpy views.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ledger_core.h"

namespace py = pybind11;
using spo_fast::LedgerCore;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;  // no forcecast: a wrong dtype is an error, never a silent copy

template <typename T>
const T* checked(const CArray<T>& a, int64_t n, const char* name) {
  if (a.ndim() != 1 || a.shape(0) != n)
    throw std::invalid_argument(std::string(name) + " must be a 1-d array of length " + std::to_string(n));
  return a.data();
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

template <typename T>
py::tuple select(const CArray<T>& scores, double threshold, double band, int64_t seed, int64_t pass_index,
                 int64_t step) {
  if (scores.ndim() != 2) throw std::invalid_argument("scores must have shape [k, b]");
  const int64_t k = scores.shape(0), b = scores.shape(1);
  py::array_t<int64_t> win(b), lose(b), next(b);
  py::array_t<bool> valid(b), undecided(b);
  py::array_t<float> margin(b);
  int64_t n_undecided;
  {
    py::gil_scoped_release nogil;
    n_undecided = spo_fast::select_columns<T>(
        scores.data(), k, b, threshold, band, win.mutable_data(), lose.mutable_data(),
        reinterpret_cast<uint8_t*>(valid.mutable_data()), margin.mutable_data(),
        reinterpret_cast<uint8_t*>(undecided.mutable_data()));
    spo_fast::continuation_indices(seed, pass_index, step, b, k, next.mutable_data());
  }
  return py::make_tuple(win, lose, valid, margin, next, undecided, n_undecided);
}

// LedgerCore::select_and_record over numpy arrays: one Python -> C++ crossing per scored step. Returns (win, lose,
// valid, margin, next, undecided), undecided being None in the common case that every column was decided (and the step
// recorded). The GIL is kept: the work is a few hundred nanoseconds, less than releasing and re-taking it.
template <typename T>
py::tuple select_and_record(LedgerCore& self, const CArray<T>& scores, double threshold, double band, int64_t seed,
                            int64_t step, int64_t timestep, const CArray<int64_t>& parent) {
  if (scores.ndim() != 2) throw std::invalid_argument("scores must have shape [k, b]");
  const int64_t k = scores.shape(0), b = scores.shape(1);
  const int64_t* p = checked(parent, b, "parent");
  py::array_t<int64_t> win(b), lose(b), next(b);
  py::array_t<bool> valid(b);
  py::array_t<float> margin(b);
  std::vector<uint8_t> undecided(static_cast<size_t>(b));
  const int64_t n_undecided = self.select_and_record<T>(
      scores.data(), k, b, threshold, band, seed, step, timestep, p, win.mutable_data(), lose.mutable_data(),
      reinterpret_cast<uint8_t*>(valid.mutable_data()), margin.mutable_data(), next.mutable_data(), undecided.data());
  py::object und = py::none();
  if (n_undecided > 0) {
    py::array_t<bool> u(b);
    std::memcpy(u.mutable_data(), undecided.data(), undecided.size());  // bool is one byte, 0 or 1
    und = std::move(u);
  }
  return py::make_tuple(win, lose, valid, margin, next, und);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "spo_fast resampler bookkeeping (C++): counter RNG, pair selection, pair ledger, permutation";
  m.attr("API_VERSION") = spo_fast::kApiVersion;

  m.def(
      "continuation_indices",
      [](int64_t seed, int64_t pass_index, int64_t step, int64_t batch, int64_t k) {
        py::array_t<int64_t> out(batch);
        spo_fast::continuation_indices(seed, pass_index, step, batch, k, out.mutable_data());
        return out;
      },
      py::arg("seed"), py::arg("pass_index"), py::arg("step"), py::arg("batch"), py::arg("k"));
  m.def("select_step_f32", &select<float>, py::arg("scores"), py::arg("threshold"), py::arg("band"), py::arg("seed"),
        py::arg("pass_index"), py::arg("step"));
  m.def("select_step_f64", &select<double>, py::arg("scores"), py::arg("threshold"), py::arg("band"),
        py::arg("seed"), py::arg("pass_index"), py::arg("step"));
  m.def(
      "epoch_order",
      [](int64_t seed, int64_t epoch, int64_t n) {
        py::array_t<int64_t> out(n);
        {
          py::gil_scoped_release nogil;
          spo_fast::epoch_order(seed, epoch, n, out.mutable_data());
        }
        return out;
      },
      py::arg("seed"), py::arg("epoch"), py::arg("n"));

  m.def(
      "shard",
      [](const CArray<int64_t>& order, int64_t rank, int64_t world, bool drop_remainder) {
        if (order.ndim() != 1) throw std::invalid_argument("order must be 1-d");
        return to_array(spo_fast::shard(order.data(), order.shape(0), rank, world, drop_remainder));
      },
      py::arg("order"), py::arg("rank"), py::arg("world_size"), py::arg("drop_remainder"));

  py::class_<LedgerCore>(m, "LedgerCore")
      .def(py::init<>())
      .def("begin_pass",
           [](LedgerCore& self, int64_t pass_index, const CArray<int64_t>& ids) {
             if (ids.ndim() != 1) throw std::invalid_argument("prompt_ids must be 1-d");
             self.begin_pass(pass_index, ids.data(), ids.shape(0));
           })
      .def("record",
           [](LedgerCore& self, int64_t step, int64_t timestep, const CArray<int64_t>& win, const CArray<int64_t>& lose,
              const CArray<bool>& valid, const CArray<float>& margin, const CArray<int64_t>& parent) {
             const int64_t b = win.ndim() == 1 ? win.shape(0) : -1;
             self.record(step, timestep, checked(win, b, "win"), checked(lose, b, "lose"),
                         reinterpret_cast<const uint8_t*>(checked(valid, b, "valid")), checked(margin, b, "margin"),
                         checked(parent, b, "parent"), b);
           })
      .def("select_and_record_f32", &select_and_record<float>, py::arg("scores"), py::arg("threshold"),
           py::arg("band"), py::arg("seed"), py::arg("step"), py::arg("timestep"), py::arg("parent"))
      .def("select_and_record_f64", &select_and_record<double>, py::arg("scores"), py::arg("threshold"),
           py::arg("band"), py::arg("seed"), py::arg("step"), py::arg("timestep"), py::arg("parent"))
      .def("end_pass",
           [](LedgerCore& self) {
             spo_fast::PassPairs p = self.end_pass();
             return py::make_tuple(to_array(p.step_slot), to_array(p.column), to_array(p.win), to_array(p.lose),
                                   to_array(p.timestep), to_array(p.prompt_id), to_array(p.parent),
                                   to_array(p.margin), p.num_invalid, p.num_nan_prompts);
           })
      .def("stats",
           [](const LedgerCore& self) {
             py::dict out;
             for (const auto& [t, s] : self.stats) out[py::int_(t)] = py::make_tuple(s.count, s.valid, s.nan, s.margin_sum);
             return out;
           })
      .def("get_pass",
           [](const LedgerCore& self) -> py::object {
             if (!self.in_pass) return py::none();
             py::dict d;
             d["pass_index"] = self.pass_index;
             d["prompt_ids"] = to_array(self.prompt_ids);
             d["steps"] = to_array(self.steps);
             d["timesteps"] = to_array(self.timesteps);
             d["win"] = to_array(self.win);
             d["lose"] = to_array(self.lose);
             d["parent"] = to_array(self.parent);
             py::array_t<bool> valid(static_cast<py::ssize_t>(self.valid.size()));
             std::memcpy(valid.mutable_data(), self.valid.data(), self.valid.size());  // bool is one byte, 0 or 1
             d["valid"] = valid;
             d["margin"] = to_array(self.margin);
             return d;
           })
      .def("set_stats",
           [](LedgerCore& self, const py::dict& stats) {
             self.stats.clear();
             for (const auto& item : stats) {
               auto t = item.first.cast<int64_t>();
               auto v = item.second.cast<py::sequence>();
               spo_fast::TimestepStats s;
               s.count = v[0].cast<int64_t>();
               s.valid = v[1].cast<int64_t>();
               s.nan = v[2].cast<int64_t>();
               s.margin_sum = v[3].cast<double>();
               self.stats[t] = s;
             }
           })
      .def("set_pass", [](LedgerCore& self, const py::object& state) {
        self.in_pass = false;
        if (state.is_none()) return;
        py::dict d = state.cast<py::dict>();
        auto ids = d["prompt_ids"].cast<CArray<int64_t>>();
        self.begin_pass(d["pass_index"].cast<int64_t>(), ids.data(), ids.shape(0));
        auto steps = d["steps"].cast<CArray<int64_t>>();
        auto ts = d["timesteps"].cast<CArray<int64_t>>();
        auto win = d["win"].cast<CArray<int64_t>>();
        auto lose = d["lose"].cast<CArray<int64_t>>();
        auto valid = d["valid"].cast<CArray<bool>>();
        auto margin = d["margin"].cast<CArray<float>>();
        auto parent = d["parent"].cast<CArray<int64_t>>();
        const int64_t b = self.batch, n = steps.shape(0) * b;
        if (ts.shape(0) != steps.shape(0) || win.shape(0) != n || lose.shape(0) != n || valid.shape(0) != n ||
            margin.shape(0) != n || parent.shape(0) != n)
          throw std::invalid_argument("inconsistent in-progress pass in the ledger state");
        for (int64_t s = 0; s < steps.shape(0); ++s)
          self.record(steps.data()[s], ts.data()[s], win.data() + s * b, lose.data() + s * b,
                      reinterpret_cast<const uint8_t*>(valid.data()) + s * b, margin.data() + s * b,
                      parent.data() + s * b, b);
      });
}
