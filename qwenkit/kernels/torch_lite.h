// The part of torch the kernel files use: Tensor, empty / empty_like and the dtype names, under
// torch:: as <torch/extension.h> spells them. That header (the whole C++ frontend and pybind11)
// costs ~30 s of compiling per file against ~5 s for these. No kernel file includes it:
// bindings.cpp, which makes the Python module, adds torch/csrc/utils/pybind.h (pybind11 with the
// Tensor casters) to this.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace torch {
using at::empty;
using at::empty_like;
using at::Tensor;
constexpr auto kUInt8 = at::kByte;
constexpr auto kInt64 = at::kLong;
constexpr auto kFloat32 = at::kFloat;
constexpr auto kBFloat16 = at::kBFloat16;
}  // namespace torch
