// Optional compiled op: histogram of expert ids into int32 counts.
//
// counts_E[e] = #{i : x_N[i] == e} for 0 <= e < E; ids outside [0, E) are ignored (never an
// out-of-bounds write). One pass over x with block-local shared-memory counters, then one
// atomic add per (block, bin) into global memory. No host synchronisation.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

template <typename T>
__global__ void histogram_kernel(const T* __restrict__ x, int64_t n, int num_bins,
                                 int* __restrict__ counts) {
  extern __shared__ int local[];
  for (int b = threadIdx.x; b < num_bins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t v = static_cast<int64_t>(x[i]);
    if (v >= 0 && v < num_bins) atomicAdd(&local[v], 1);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < num_bins; b += blockDim.x) {
    if (local[b] != 0) atomicAdd(&counts[b], local[b]);
  }
}

torch::Tensor histogram(torch::Tensor x, int64_t num_bins) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor");
  TORCH_CHECK(x.dim() == 1, "x: expected a 1-D tensor");
  TORCH_CHECK(x.scalar_type() == torch::kInt32 || x.scalar_type() == torch::kInt64,
              "x: expected int32 or int64");
  TORCH_CHECK(num_bins > 0 && num_bins <= 12288, "num_bins: expected 1..12288");
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto counts = torch::zeros({num_bins}, x.options().dtype(torch::kInt32));
  const int64_t n = xc.numel();
  if (n == 0) return counts;
  const int threads = 256;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(std::min<int64_t>(want, 4LL * sms));
  const size_t smem = num_bins * sizeof(int);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (xc.scalar_type() == torch::kInt32) {
    histogram_kernel<int><<<blocks, threads, smem, stream>>>(
        xc.data_ptr<int>(), n, static_cast<int>(num_bins), counts.data_ptr<int>());
  } else {
    histogram_kernel<int64_t><<<blocks, threads, smem, stream>>>(
        xc.data_ptr<int64_t>(), n, static_cast<int>(num_bins), counts.data_ptr<int>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("histogram", &histogram, "int32 histogram of ids in [0, num_bins) (CUDA)");
}
