// Deferred error checks of the CUDA ops. The CUDA ops validate index values on the device and
// record bad input there instead of making the host wait (csrc/cuda/tt_kernels.h); the binding
// raises a recorded error at the next op call once its copy has reached the host, at
// ttdist::check_errors (which waits), or at once in synchronous mode. ops.cpp (built without
// CUDA) holds the mode and exposes both as ops; ops_cuda.cpp registers the CUDA side.
#pragma once

#include <c10/core/Device.h>

namespace ttdist {

// Synchronous mode: every CUDA op waits for its own checks and raises at once (like
// CUDA_LAUNCH_BLOCKING for errors; slow). Default: the environment's TTDIST_SYNC_CHECKS=1, else off.
bool sync_checks();
bool set_sync_checks(bool enabled);  // returns the previous mode

// Waits for every recorded check of `device` and raises the first error found, if any.
using CheckErrorsFn = void (*)(c10::DeviceIndex device);
void register_cuda_check_errors(CheckErrorsFn fn);
void check_errors(const c10::Device& device);

}  // namespace ttdist
