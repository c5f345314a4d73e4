// Device metadata made safe (docs/ARCHITECTURE.md §1, "device metadata"). `prefix_index`,
// `seqlen_q`, `seqlen_k` may be device tensors that the host never checked; before the
// attention kernels run, prefix_attn_meta_clamp copies them through these rules into a
// scratch array, and the attention kernels read only that copy (or host metadata, which the
// planner checked). Lengths are clamped to 0..=Tq and 0..=Tk, and a prefix index outside
// 0..NP means no prefix (-1); with these no value can make a kernel read or write outside the
// tensors the planner validated, and a valid value passes unchanged. Clamping in a separate
// pass keeps the attention kernels' registers as they are (the backward's dK/dV kernels run
// at the 255-register limit) and costs one tiny launch only when metadata is on the device.
#pragma once
#include "params.h"
#include "platform.cuh"

namespace pa {

PA_DEVICE int clamp_len(int v, int max) { return v < 0 ? 0 : (v > max ? max : v); }

PA_DEVICE int clamp_prefix(int v, int num_prefixes) { return v >= 0 && v < num_prefixes ? v : -1; }

}  // namespace pa
