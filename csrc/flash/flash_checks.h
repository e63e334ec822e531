// Input checks shared by the softmax-attention ops that run on the flash core (SQA, DMA, ...).
// Every message names the argument.
#pragma once
#include <torch/all.h>

#include "common/checks.h"
#include "common/static_switch.h"

namespace attnkit::flash {

// q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D]. With for_cuda_kernel, also the CUDA kernel's limits:
// fp16 / bf16 and D a multiple of 8 up to 256.
inline void check_qkv_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             bool for_cuda_kernel = false) {
  ATTNKIT_CHECK_DIM(q, 4);
  ATTNKIT_CHECK_DIM(k, 4);
  ATTNKIT_CHECK_DIM(v, 4);
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble,
              "q must be float16, bfloat16, float32 or float64 (got ", dt, ")");
  TORCH_CHECK(k.scalar_type() == dt, "k must have the dtype of q (", dt, "), got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == dt, "v must have the dtype of q (", dt, "), got ", v.scalar_type());
  ATTNKIT_CHECK_DEVICE(k, q.device());
  ATTNKIT_CHECK_DEVICE(v, q.device());
  TORCH_CHECK(k.size(0) == q.size(0), "k must have the batch size of q (", q.size(0), "), got ", k.size(0));
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), "k must have the head dim of q (", q.size(3), "), got ", k.size(3));
  TORCH_CHECK(q.size(3) > 0, "q must have a non-zero head dim");
  const int64_t hq = q.size(2), hkv = k.size(2);
  TORCH_CHECK(hq > 0, "q must have at least one head");
  TORCH_CHECK(hkv > 0, "k must have at least one head");
  TORCH_CHECK(hq % hkv == 0 || hkv % hq == 0, "the head counts of q (", hq, ") and k (", hkv,
              ") must divide one another");
  ATTNKIT_CHECK_LAST_CONTIGUOUS(q);
  ATTNKIT_CHECK_LAST_CONTIGUOUS(k);
  ATTNKIT_CHECK_LAST_CONTIGUOUS(v);
  if (for_cuda_kernel) {
    TORCH_CHECK(is_half_type(dt), "q must be float16 or bfloat16 on CUDA (got ", dt, ")");
    TORCH_CHECK(attnkit_flash_headdim_supported(q.size(3)), "q has head dim ", q.size(3),
                "; the CUDA kernel supports multiples of 8 from 8 to 256");
  }
}

// dout and out [B, Lq, max(Hq, Hkv), D] in the dtype of q; lse [B, max(Hq, Hkv), Lq] fp32.
inline void check_backward_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& out, const at::Tensor& lse) {
  const int64_t hout = std::max(q.size(2), k.size(2));
  const std::vector<int64_t> oshape{q.size(0), q.size(1), hout, q.size(3)};
  const std::vector<int64_t> lshape{q.size(0), hout, q.size(1)};
  TORCH_CHECK(out.sizes() == at::IntArrayRef(oshape), "out must have shape ", at::IntArrayRef(oshape), ", got ",
              out.sizes());
  TORCH_CHECK(dout.sizes() == at::IntArrayRef(oshape), "dout must have shape ", at::IntArrayRef(oshape), ", got ",
              dout.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lshape), "lse must have shape ", at::IntArrayRef(lshape), ", got ",
              lse.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "out must have the dtype of q");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "dout must have the dtype of q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32 (got ", lse.scalar_type(), ")");
  ATTNKIT_CHECK_DEVICE(dout, q.device());
  ATTNKIT_CHECK_DEVICE(out, q.device());
  ATTNKIT_CHECK_DEVICE(lse, q.device());
  ATTNKIT_CHECK_LAST_CONTIGUOUS(dout);
  ATTNKIT_CHECK_LAST_CONTIGUOUS(out);
  ATTNKIT_CHECK_LAST_CONTIGUOUS(lse);
}

}  // namespace attnkit::flash
