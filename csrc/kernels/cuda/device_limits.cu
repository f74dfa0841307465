// What the planners need to know about a device, asked once per device by the glue.
#include "cuda_kernels.h"

namespace condensed_ops::kernels::cuda {

cudaError_t query_device_limits(int device, DeviceLimits* limits) {
  cudaError_t err = cudaDeviceGetAttribute(&limits->multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&limits->max_shared_bytes_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&limits->max_shared_bytes_per_multiprocessor,
                                 cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  }
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&limits->max_grid_y, cudaDevAttrMaxGridDimY, device);
  int major = 0, minor = 0;
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  limits->compute_capability = 10 * major + minor;
  return err;
}

}  // namespace condensed_ops::kernels::cuda
