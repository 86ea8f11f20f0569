// The decay tables and the log-decay gradient helpers of decay_tables.h: the device dispatch,
// and the CPU builder (a host loop, O(H·W) per head: cheaper than the ATen ops it replaces).
#include "decay_tables.h"

#include <ATen/Dispatch.h>

#include <limits>

namespace ppma {
namespace {

// One head's (H, W) log decays a → the running sums of the finite ones along each row
// (along_rows) or column, each line's first log decay left out: it never enters the mask
// (§1), and summing it would offset the whole line (a huge one drowning the others'
// differences, a −inf one needing a count). counts: the running number of −inf log decays;
// *blocked is set when one was counted. Sums run in double and are rounded once per entry,
// as ATen's CPU cumsum does.
template <typename T>
void head_line_sums(const T* a, int64_t H, int64_t W, bool along_rows, T* sums, T* counts,
                    bool* blocked) {
  const int64_t lines = along_rows ? H : W, steps = along_rows ? W : H;
  const int64_t line_stride = along_rows ? W : 1, step_stride = along_rows ? 1 : W;
  for (int64_t line = 0; line < lines; ++line) {
    double sum = 0;
    T count = 0;
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t e = line * line_stride + t * step_stride;
      if (t > 0 && a[e] == -std::numeric_limits<T>::infinity()) {
        count += T(1);
      } else if (t > 0) {
        sum += static_cast<double>(a[e]);
      }
      sums[e] = static_cast<T>(sum);
      counts[e] = count;
    }
    *blocked = *blocked || count > T(0);
  }
}

}  // namespace

DecayTables decay_tables_cpu(const at::Tensor& log_alpha, const at::Tensor& log_beta,
                             at::ScalarType acc) {
  const int64_t bh = log_alpha.size(0) * log_alpha.size(1);
  const int64_t H = log_alpha.size(2), W = log_alpha.size(3);
  const at::Tensor la = log_alpha.to(acc).contiguous(), lb = log_beta.to(acc).contiguous();
  const auto opts = la.options();
  DecayTables t{at::empty({bh, H, W}, opts), at::empty({bh, H, W}, opts),
                at::empty({bh, H, W}, opts), at::empty({bh, H, W}, opts)};
  bool blocked = false;
  AT_DISPATCH_FLOATING_TYPES(acc, "ppma_decay_tables", [&] {
    for (int64_t h = 0; h < bh; ++h) {
      const int64_t o = h * H * W;
      head_line_sums(la.const_data_ptr<scalar_t>() + o, H, W, true,
                     t.ca.mutable_data_ptr<scalar_t>() + o, t.na.mutable_data_ptr<scalar_t>() + o,
                     &blocked);
      head_line_sums(lb.const_data_ptr<scalar_t>() + o, H, W, false,
                     t.cb.mutable_data_ptr<scalar_t>() + o, t.nb.mutable_data_ptr<scalar_t>() + o,
                     &blocked);
    }
  });
  if (!blocked) t.na = t.nb = at::Tensor();  // the kernels' plain path
  return t;
}

DecayTables decay_tables(const at::Tensor& log_alpha, const at::Tensor& log_beta,
                         at::ScalarType acc) {
  if (log_alpha.is_cpu()) return decay_tables_cpu(log_alpha, log_beta, acc);
#if defined(PPMA_WITH_CUDA)
  return decay_tables_cuda(log_alpha, log_beta, acc);
#else
  TORCH_CHECK(false, "ppma_ops: decay tables on ", log_alpha.device(), " (built without CUDA)");
#endif
}

at::Tensor reverse_line_cumsum(const at::Tensor& t, bool along_rows) {
  const int64_t dim = along_rows ? -1 : -2;
  if (t.is_cpu()) return t.flip(dim).cumsum(dim).flip(dim);
#if defined(PPMA_WITH_CUDA)
  return reverse_line_cumsum_cuda(t, along_rows);
#else
  TORCH_CHECK(false, "ppma_ops: reverse cumsum on ", t.device(), " (built without CUDA)");
#endif
}

void finish_decay_grads(const DecayTables& tables, const at::Tensor& log_alpha,
                        const at::Tensor& log_beta, at::Tensor& dla, at::Tensor& dlb) {
  if (tables.na.defined()) {  // some log decay may be −inf
    dla = dla.masked_fill(at::isneginf(log_alpha).reshape(dla.sizes()), 0);
    dlb = dlb.masked_fill(at::isneginf(log_beta).reshape(dlb.sizes()), 0);
  }
  if (dla.numel() == 0) return;
  dla.select(-1, 0).zero_();
  dlb.select(-2, 0).zero_();
}

}  // namespace ppma
