// Lightning attention on CUDA: planning (tile shapes, sequence splitting), dispatch to the pass
// instantiations, the d slopes reduction and the decode step.
#include <algorithm>

#include "lightning/lightning_cuda.h"
#include "lightning/lightning_kernel.cuh"

namespace attnkit::lightning {

namespace kern {
// Defined in inst/lightning_pass_*.cu.
extern template cudaError_t launch_pass<__half, 32>(const PassParams&, cudaStream_t);
extern template cudaError_t launch_pass<__half, 64>(const PassParams&, cudaStream_t);
extern template cudaError_t launch_pass<__nv_bfloat16, 32>(const PassParams&, cudaStream_t);
extern template cudaError_t launch_pass<__nv_bfloat16, 64>(const PassParams&, cudaStream_t);
extern template cudaError_t launch_pass<float, 32>(const PassParams&, cudaStream_t);
extern template cudaError_t launch_pass<float, 64>(const PassParams&, cudaStream_t);
}  // namespace kern

namespace {

struct DeviceInfo {
  int max_optin = 0;    // dynamic shared memory per block, opt-in
  int smem_per_sm = 0;  // shared memory per multiprocessor
  int sms = 0;
};

bool device_info(DeviceInfo& info) {
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];
  static bool cached[kMaxDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return false;
  if (dev < kMaxDevices && cached[dev]) {
    info = cache[dev];
    return true;
  }
  DeviceInfo d;
  if (cudaDeviceGetAttribute(&d.max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return false;
  if (dev < kMaxDevices) {
    cache[dev] = d;
    cached[dev] = true;
  }
  info = d;
  return true;
}

int elem_size(ElemType t) { return t == ElemType::kFloat32 ? 4 : 2; }

}  // namespace

size_t pass_smem_bytes(const PassParams& p) {
  return kern::pass_smem_layout(elem_size(p.dtype), p.block_t, p.dk, p.bv, p.deriv).total;
}

int max_smem_optin() {
  DeviceInfo info;
  return device_info(info) ? info.max_optin : 0;
}

int plan_pass_cuda(PassParams& p, int64_t requested_block, int64_t requested_splits, int64_t total_rows) {
  if (requested_block != 0 && requested_block != 32 && requested_block != 64) return kPlanBadBlock;
  DeviceInfo info;
  if (!device_info(info)) return kPlanDeviceError;
  const int es = elem_size(p.dtype);
  const int dv16 = (p.dv + 15) / 16 * 16;
  const int blocks[2] = {requested_block ? int(requested_block) : 64, requested_block ? 0 : 32};
  int bt = 0, bv = 0;
  size_t smem = 0;
  for (int bi = 0; bi < 2 && bt == 0; ++bi) {
    if (blocks[bi] == 0) continue;
    for (int cand : {64, 32, 16}) {
      if (cand > 16 && cand / 2 >= dv16) continue;  // narrower slabs cover dv as well
      const size_t bytes = kern::pass_smem_layout(es, blocks[bi], p.dk, cand, p.deriv).total;
      if (bytes <= size_t(info.max_optin)) {
        bt = blocks[bi];
        bv = cand;
        smem = bytes;
        break;
      }
    }
  }
  if (bt == 0) {
    p.block_t = blocks[0];
    p.bv = 16;
    return kPlanNoFit;
  }
  p.block_t = bt;
  p.bv = bv;
  p.num_slabs = (p.dv + bv - 1) / bv;
  if (requested_splits > 0) {
    p.num_segments = int(std::min<int64_t>(requested_splits, 4096));  // grid.z; more never helps
    return kPlanOk;
  }
  const int64_t blocks_total = int64_t(p.num_seqs) * p.num_heads * p.num_slabs;
  const int64_t per_sm = std::clamp<int64_t>(int64_t(info.smem_per_sm) / int64_t(smem + 1024), 1, 8);
  const int64_t slots = int64_t(info.sms) * per_sm;
  int64_t nseg = 1;
  if (2 * blocks_total < slots) {
    const int64_t rows = p.cu_seqlens ? total_rows / std::max(1, p.num_seqs) : p.seqlen;
    const int64_t chunks = (rows + bt - 1) / bt;
    nseg = std::min<int64_t>({(slots + blocks_total - 1) / blocks_total, std::max<int64_t>(1, chunks / 2), 64});
  }
  p.num_segments = int(std::max<int64_t>(1, nseg));
  return kPlanOk;
}

cudaError_t run_pass_cuda(const PassParams& p, cudaStream_t stream) {
  const bool b64 = p.block_t == 64;
  switch (p.dtype) {
    case ElemType::kFloat16:
      return b64 ? kern::launch_pass<__half, 64>(p, stream) : kern::launch_pass<__half, 32>(p, stream);
    case ElemType::kBFloat16:
      return b64 ? kern::launch_pass<__nv_bfloat16, 64>(p, stream) : kern::launch_pass<__nv_bfloat16, 32>(p, stream);
    case ElemType::kFloat32:
      return b64 ? kern::launch_pass<float, 64>(p, stream) : kern::launch_pass<float, 32>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t reduce_dslopes_cuda(const PassParams& p, float* dslopes, cudaStream_t stream) {
  return kern::launch_reduce_dslopes<0>(p, dslopes, stream);
}

cudaError_t decode_cuda(const DecodeParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case ElemType::kFloat16:
      return kern::launch_decode<__half>(p, stream);
    case ElemType::kBFloat16:
      return kern::launch_decode<__nv_bfloat16>(p, stream);
    case ElemType::kFloat32:
      return kern::launch_decode<float>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace attnkit::lightning
