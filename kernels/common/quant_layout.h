// How the scales and zero points of a quantized tensor map onto its elements.
//
// Every supported granularity is the same picture: the contiguous tensor seen as
// [outer, channels, inner], element e = (o * channels + c) * inner + i using scale[c].
//   per-tensor:              outer = 1, channels = 1, inner = numel
//   per-channel (axis a):    outer = prod(shape[:a]), channels = shape[a], inner = prod(shape[a+1:])
//   group-wise (group g):    outer = 1, channels = numel / g, inner = g   (groups along the last dim)
#pragma once
#include <cstdint>

#include "hd.h"

namespace pypaper {
namespace quant {

struct QuantLayout {
  int64_t outer;
  int64_t channels;
  int64_t inner;

  PYPAPER_HD int64_t numel() const { return outer * channels * inner; }
  PYPAPER_HD int64_t channel_of(int64_t e) const { return (e / inner) % channels; }
};

}  // namespace quant
}  // namespace pypaper
