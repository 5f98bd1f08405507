// fusedlr._C.StepPlan: the eager fast path of fusedlr.AdamW.step on the CPU and CUDA (csrc/step_plan.cpp).
#pragma once

#include <Python.h>

namespace fusedlr {

// Adds the StepPlan type to the module ``fusedlr._C``; returns 0, or -1 with a Python error set.
int add_step_plan_type(PyObject* module);

}  // namespace fusedlr
