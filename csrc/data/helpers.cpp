// Placeholder until the dataset index builders land (issue: data pipeline).
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_helpers, m) {}
