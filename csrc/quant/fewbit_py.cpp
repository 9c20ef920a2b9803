// pybind11 binding of the few-bit DP (csrc/quant/fewbit_dp.h) on numpy arrays, for
// pypaper/quant/fewbit/tables.py, which builds every activation's table with it at first use.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "fewbit_dp.h"

namespace py = pybind11;

namespace pypaper {

void register_fewbit(py::module_& m) {
  using Array = py::array_t<double, py::array::c_style | py::array::forcecast>;
  m.def(
      "fewbit_optimal_fit",
      [](Array grid, Array deriv, Array weight, int pieces) {
        if (grid.ndim() != 1 || deriv.ndim() != 1 || weight.ndim() != 1) {
          throw py::value_error("grid, deriv and weight must be 1-D arrays");
        }
        const int64_t n = grid.shape(0);
        if (deriv.shape(0) != n || weight.shape(0) != n) {
          throw py::value_error("grid, deriv and weight must have one length");
        }
        fewbit::PiecewiseFit fit;
        try {
          py::gil_scoped_release release;
          fit = fewbit::optimal_piecewise_constant(grid.data(), deriv.data(), weight.data(), n,
                                                   pieces);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
        Array borders(static_cast<py::ssize_t>(fit.borders.size()));
        Array levels(static_cast<py::ssize_t>(fit.levels.size()));
        std::copy(fit.borders.begin(), fit.borders.end(), borders.mutable_data());
        std::copy(fit.levels.begin(), fit.levels.end(), levels.mutable_data());
        return py::make_tuple(borders, levels, fit.error);
      },
      py::arg("grid"), py::arg("deriv"), py::arg("weight"), py::arg("pieces"),
      "Exact DP: the piecewise-constant q with `pieces` pieces minimising "
      "sum_i weight_i (deriv_i - q(grid_i))^2. Returns (borders, levels, error).");
}

}  // namespace pypaper
