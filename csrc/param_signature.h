// What a cached launch plan depends on, per parameter (the Python spec: fusedlr.plan.scan), shared by
// fusedlr._C.scan_grads (csrc/bindings.cpp) and the eager fast path (csrc/step_plan.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "op_common.h"

namespace fusedlr {

// Words per parameter in a signature.
constexpr int kSigWords = 3;

// Writes the signature words of parameter ``p`` with gradient ``g`` (undefined: none) into ``words``:
// storage address, element count, and dtype/device/grad presence/grad dtype packed in one word.
// Returns false when the kernels cannot read ``g`` (sparse, another shape or device, an unsupported
// dtype): the caller then refuses it, naming it, before anything is modified.
inline bool param_signature(const at::Tensor& p, const at::Tensor& g, int64_t* words) {
  const int p_code = dtype_code(p.scalar_type());
  int g_code = 0;
  bool ok = true;
  if (g.defined()) {
    g_code = g.layout() == at::kStrided ? dtype_code(g.scalar_type()) : -1;
    ok = !(g_code < 0 || p_code < 0 || g.sizes() != p.sizes() || g.device() != p.device());
  }
  words[0] = p.unsafeGetTensorImpl()->has_storage() ? reinterpret_cast<int64_t>(p.const_data_ptr()) : 0;
  words[1] = p.numel();
  words[2] = static_cast<int64_t>(p_code + 1) | (static_cast<int64_t>(g_code + 1) << 8) |
             (static_cast<int64_t>(g.defined()) << 16) | (static_cast<int64_t>(p.device().type()) << 24) |
             (static_cast<int64_t>(p.device().index() + 1) << 32);
  return ok;
}

// The param and grad dtype codes packed in a signature's third word (-1: unsupported, or no grad).
inline int signature_param_code(int64_t word) { return static_cast<int>(word & 0xff) - 1; }
inline int signature_grad_code(int64_t word) { return static_cast<int>((word >> 8) & 0xff) - 1; }
inline bool signature_has_grad(int64_t word) { return ((word >> 16) & 1) != 0; }

}  // namespace fusedlr
