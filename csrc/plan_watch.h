// fusedlr._C.watch_unchanged: whether param_groups and optimizer.state still hold what a cached plan was built
// from (csrc/plan_watch.cpp; the Python spec: fusedlr/watch.py).
#pragma once

#include <Python.h>

namespace fusedlr {

// watch_unchanged(param_groups, state, watched, options) -> bool: fusedlr.watch.unchanged, in one pass.
PyObject* watch_unchanged(PyObject* self, PyObject* args);

}  // namespace fusedlr
