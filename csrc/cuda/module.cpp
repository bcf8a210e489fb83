// Op schemas, input validation and CUDA registrations for jacfast._C_cuda. All m.def
// calls live here. The kernels and their launchers are in jacobian_matching.cu (loss
// head, contract in csrc/README.md) and topk_seeds.cu (topk_seeds op).
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

namespace jacfast_cuda {

// jacobian_matching.cu: launch on the current stream; inputs already validated.
// With gs defined (forward_backward), rows that fit in registers get their gradient written
// in the same pass; returns whether it was.
bool launch_forward(const at::Tensor& s, const at::Tensor& t, int64_t kind, int64_t reduction, double eps,
                    double scale, at::Tensor& loss, at::Tensor& coef, const at::Tensor& gs = at::Tensor());
void launch_backward(const at::Tensor& grad_loss, const at::Tensor& s, const at::Tensor& t,
                     const at::Tensor& coef, int64_t reduction, double scale, at::Tensor& gs, at::Tensor& gt);
// 0: forward then backward, 1: rows fused in registers, 2: split rows fused at a row barrier.
int64_t forward_backward_path(int64_t R, int64_t D, at::ScalarType dtype, int64_t kind);
// (team threads, splits, groups per segment) of the loss head's split plan; host code only.
std::tuple<int64_t, int64_t, int64_t> split_plan(int64_t R, int64_t D, int64_t elem_size);
// topk_seeds.cu
std::tuple<at::Tensor, at::Tensor> topk_seeds(const at::Tensor& logits, int64_t k);

namespace {

void check_kind_reduction(const char* op, int64_t kind, int64_t reduction) {
  TORCH_CHECK(kind >= 0 && kind <= 2, op, ": kind must be 0 (normalized), 1 (squared) or 2 (norm), got ", kind);
  TORCH_CHECK(reduction == 0 || reduction == 1, op, ": reduction must be 0 (none) or 1 (scaled sum), got ",
              reduction);
}

// Validates student/teacher (kernels assume 2-D contiguous rows, R, D >= 1, same dtype
// and device); returns the teacher, undefined when absent.
at::Tensor check_rows(const char* op, const at::Tensor& student, const std::optional<at::Tensor>& teacher) {
  TORCH_CHECK(student.defined(), op, ": student is undefined");
  TORCH_CHECK(student.is_cuda(), op, ": student must be a CUDA tensor, got device ", student.device());
  TORCH_CHECK(student.dim() == 2, op, ": student must be 2-D (R, D), got shape ", student.sizes());
  TORCH_CHECK(student.size(0) >= 1 && student.size(1) >= 1, op,
              ": student must have R >= 1 rows and D >= 1 columns, got shape ", student.sizes());
  TORCH_CHECK(student.is_contiguous(), op, ": student must be contiguous");
  const auto st = student.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": dtype must be float32, float64, float16 or bfloat16, got ", st);
  at::Tensor t;
  if (teacher.has_value() && teacher->defined()) {
    t = *teacher;
    TORCH_CHECK(t.device() == student.device(), op, ": teacher is on ", t.device(), " but student is on ",
                student.device());
    TORCH_CHECK(t.scalar_type() == st, op, ": teacher dtype ", t.scalar_type(), " differs from student dtype ", st);
    TORCH_CHECK(t.sizes() == student.sizes(), op, ": teacher shape ", t.sizes(), " differs from student shape ",
                student.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": teacher must be contiguous");
  }
  return t;
}

// Allocates loss/coef and runs the forward kernels (1 launch, or 2 when rows are split
// or reduction == 1). Caller holds the device guard.
std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& student, const at::Tensor& t, int64_t kind,
                                               int64_t reduction, double eps, double scale) {
  const int64_t R = student.size(0);
  at::Tensor loss = reduction == 0 ? at::empty({R}, student.options()) : at::empty({}, student.options());
  at::Tensor coef = at::empty({R, 3}, student.options().dtype(at::kDouble));
  // norm (kind 2) never reads the teacher.
  launch_forward(student, kind == 2 ? at::Tensor() : t, kind, reduction, eps, scale, loss, coef);
  return {loss, coef};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                                           int64_t kind, int64_t reduction, double eps, double scale) {
  const char* op = "jacfast_cuda.forward";
  check_kind_reduction(op, kind, reduction);
  const at::Tensor t = check_rows(op, student, teacher);
  c10::cuda::CUDAGuard guard(student.device());
  return run_forward(student, t, kind, reduction, eps, scale);
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_loss, const at::Tensor& student,
                                            const std::optional<at::Tensor>& teacher, const at::Tensor& coef,
                                            int64_t reduction, double scale, bool need_student, bool need_teacher) {
  const char* op = "jacfast_cuda.backward";
  TORCH_CHECK(reduction == 0 || reduction == 1, op, ": reduction must be 0 or 1, got ", reduction);
  const at::Tensor t = check_rows(op, student, teacher);
  const int64_t R = student.size(0);
  TORCH_CHECK(coef.defined() && coef.device() == student.device() && coef.scalar_type() == at::kDouble &&
                  coef.dim() == 2 && coef.size(0) == R && coef.size(1) == 3,
              op, ": coef must be a float64 (", R, ", 3) tensor on ", student.device());
  TORCH_CHECK(grad_loss.defined() && grad_loss.device() == student.device() &&
                  at::isFloatingType(grad_loss.scalar_type()),
              op, ": grad_loss must be a floating-point tensor on ", student.device());
  const int64_t expect = reduction == 0 ? R : 1;
  TORCH_CHECK(grad_loss.numel() == expect, op, ": grad_loss must have ", expect, " element(s) for reduction ",
              reduction, ", got shape ", grad_loss.sizes());
  c10::cuda::CUDAGuard guard(student.device());

  at::Tensor gs = need_student ? at::empty(student.sizes(), student.options()) : at::Tensor();
  at::Tensor gt = (need_teacher && t.defined()) ? at::empty(student.sizes(), student.options()) : at::Tensor();
  if (gs.defined() || gt.defined()) {
    // grad_loss is read in the input dtype or in float64 directly, with any stride for
    // reduction 0 (e.g. an expanded grad); other dtypes cost one conversion launch.
    at::Tensor gl = grad_loss.reshape({-1});
    if (gl.scalar_type() != student.scalar_type() && gl.scalar_type() != at::kDouble) gl = gl.to(at::kDouble);
    launch_backward(gl, student, t, coef.contiguous(), reduction, scale, gs, gt);  // 1 launch
  }
  const at::Tensor empty = at::empty({0}, student.options());
  return {gs.defined() ? gs : empty, gt.defined() ? gt : empty};
}

// forward_backward: rows or row segments that fit in registers in one launch (+ a memset of
// the row counters for split rows, + the finishing launch for reduction 1), each element
// read once; other rows: forward (1 or 2 launches) followed by the
// backward kernel with an implicit grad_loss = 1 (no ones tensor is materialized).
std::tuple<at::Tensor, at::Tensor> forward_backward(const at::Tensor& student,
                                                    const std::optional<at::Tensor>& teacher, int64_t kind,
                                                    int64_t reduction, double eps, double scale) {
  const char* op = "jacfast_cuda.forward_backward";
  check_kind_reduction(op, kind, reduction);
  const at::Tensor t = check_rows(op, student, teacher);
  c10::cuda::CUDAGuard guard(student.device());
  const int64_t R = student.size(0);
  at::Tensor loss = reduction == 0 ? at::empty({R}, student.options()) : at::empty({}, student.options());
  at::Tensor coef = at::empty({R, 3}, student.options().dtype(at::kDouble));
  at::Tensor gs = at::empty(student.sizes(), student.options());
  // norm (kind 2) never reads the teacher: coef1 = coef2 = 0.
  const at::Tensor t_read = kind == 2 ? at::Tensor() : t;
  if (!launch_forward(student, t_read, kind, reduction, eps, scale, loss, coef, gs)) {
    at::Tensor no_grad_t;
    launch_backward(at::Tensor(), student, t_read, coef, reduction, scale, gs, no_grad_t);
  }
  return {loss, gs};
}

}  // namespace jacfast_cuda

TORCH_LIBRARY(jacfast_cuda, m) {
  m.def("forward(Tensor student, Tensor? teacher, int kind, int reduction, float eps, float scale) -> (Tensor, Tensor)");
  m.def("backward(Tensor grad_loss, Tensor student, Tensor? teacher, Tensor coef, int reduction, float scale, "
        "bool need_student, bool need_teacher) -> (Tensor, Tensor)");
  m.def("forward_backward(Tensor student, Tensor? teacher, int kind, int reduction, float eps, float scale) "
        "-> (Tensor, Tensor)");
  m.def("topk_seeds(Tensor logits, int k) -> (Tensor indices, Tensor seeds)");
  // Test hooks, no tensor arguments (so one implementation for every dispatch key): the
  // split plan (host code, runs without a GPU) and which kernel forward_backward runs for
  // (rows, dim, dtype, kind) on the current device.
  m.def("_plan(int rows, int dim, int element_size) -> (int, int, int)", &jacfast_cuda::split_plan);
  m.def("_fused_path(int rows, int dim, ScalarType dtype, int kind) -> int", &jacfast_cuda::forward_backward_path);
}

TORCH_LIBRARY_IMPL(jacfast_cuda, CUDA, m) {
  m.impl("forward", &jacfast_cuda::forward);
  m.impl("backward", &jacfast_cuda::backward);
  m.impl("forward_backward", &jacfast_cuda::forward_backward);
  m.impl("topk_seeds", &jacfast_cuda::topk_seeds);
}

// Empty: the module exists so `import jacfast._C_cuda` runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { (void)m; }
