// attnext's op library: every schema, nothing else.
//
// Implementations live per dispatch key in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu;
// fake (meta) kernels and autograd are registered from Python in attnext/ops.py.
// Backward passes are private ops of their own so that autograd, torch.compile
// and torch.library.opcheck all see real ops.
#include <torch/library.h>

#ifdef ATTNEXT_PYTHON_MODULE
#include <Python.h>

// Importing attnext._C runs the static TORCH_LIBRARY registrations below; the
// module itself has no Python-level members.
extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "attnext native kernels (ops are under torch.ops.attnext)", -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(attnext, m) {
  // softmax over the last dim of x * scale, query row i seeing key columns
  // j <= i (top-left) or j <= i + S - T (bottom_right); x: (..., T, S).
  m.def("causal_softmax(Tensor x, float scale=1.0, bool bottom_right=False) -> Tensor");
  // dx = scale * y * (dy - sum(dy * y)) over the visible prefix, zero elsewhere.
  m.def("_causal_softmax_backward(Tensor grad_y, Tensor y, float scale=1.0, bool bottom_right=False) -> Tensor");
  // torch.matmul's semantics (1-D operands, batch dims broadcast both ways)
  // without materialising the broadcast operands; a, b: (..., m, k), (..., k, n).
  m.def("matmul(Tensor a, Tensor b) -> Tensor");
  // (grad_a, grad_b) of matmul, each summed over the batch dims its operand was
  // broadcast along; an entry whose output_mask is false is an empty (0,) tensor.
  m.def("_matmul_backward(Tensor grad, Tensor a, Tensor b, bool[2] output_mask) -> (Tensor, Tensor)");
  // y[t] = mean(x[0..t]) over the T dim of x (..., T, C): tril-averaging in O(T * C).
  m.def("causal_mean(Tensor x) -> Tensor");
  // grad_x[t] = sum_{i >= t} grad_y[i] / (i + 1); linear, its own adjoint's adjoint is causal_mean.
  m.def("_causal_mean_backward(Tensor grad_y) -> Tensor");
  // out = dropout(causal_softmax(q k^T, scale)) v without the (T, S) matrix;
  // q: (..., T, hs), k: (..., S, hs), v: (..., S, hs_v) -> out (..., T, hs_v) and the
  // per-row logsumexp lse (..., T) (float32; float64 for float64). Dropout keeps
  // weight (b, t, j) by a counter-based hash of (seed, offset, b, t, j), so the op
  // is a pure function of its arguments. rng, when given, is an int64 tensor [seed,
  // offset] that replaces the two ints (drawn on the GPU for CUDA inputs: CUDA-graph safe).
  // window_left/right: query i sees keys d - left <= j <= d + right around its diagonal
  // key d (i, or i + S - T bottom-right), -1 meaning unbounded: (-1, 0) causal (the
  // default), (W, 0) a sliding window, (-1, -1) full attention.
  m.def(
      "causal_attention(Tensor q, Tensor k, Tensor v, float scale, float dropout_p=0.0, bool bottom_right=False, "
      "SymInt seed=0, SymInt offset=0, Tensor? rng=None, int window_left=-1, int window_right=0) "
      "-> (Tensor out, Tensor lse)");
  // (grad_q, grad_k, grad_v), recomputing the weights from lse and the dropout mask from (seed, offset).
  m.def(
      "_causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float scale, float dropout_p=0.0, bool bottom_right=False, SymInt seed=0, SymInt offset=0, Tensor? rng=None, "
      "int window_left=-1, int window_right=0) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // causal_attention over q, k, v packed as qkv (..., T, 3, nh, hs) (nanoGPT's
  // c_attn(x).view(B, T, 3, nh, hs)): the same as causal_attention on the
  // (..., nh, T, hs) views, with out (..., T, nh, hs) contiguous and lse (..., nh, T).
  m.def(
      "causal_attention_qkvpacked(Tensor qkv, float scale, float dropout_p=0.0, bool bottom_right=False, "
      "SymInt seed=0, SymInt offset=0, Tensor? rng=None, int window_left=-1, int window_right=0) "
      "-> (Tensor out, Tensor lse)");
  // grad_qkv (..., T, 3, nh, hs), contiguous: no separate q, k, v gradients to concatenate.
  m.def(
      "_causal_attention_qkvpacked_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, float scale, "
      "float dropout_p=0.0, bool bottom_right=False, SymInt seed=0, SymInt offset=0, Tensor? rng=None, "
      "int window_left=-1, int window_right=0) -> Tensor");
  // Variable-length batches (CPU): sequences packed end to end, q (total_q, H, E), k
  // (total_k, Hkv, E), v (total_k, Hkv, Ev), int32 offsets cu_seq_q/cu_seq_k (N + 1,),
  // optional seqused_k (N,); each sequence bottom-right aligned, window as above.
  // out (total_q, H, Ev), lse (H, total_q). attnext.varlen_attention is the public entry.
  m.def(
      "_varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seq_q, Tensor cu_seq_k, Tensor? seqused_k, "
      "float scale, int window_left=-1, int window_right=-1) -> (Tensor out, Tensor lse)");
  // (grad_q, grad_k, grad_v), grad_k/grad_v summed over each group of query heads.
  m.def(
      "_varlen_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seq_q, Tensor cu_seq_k, Tensor? seqused_k, float scale, int window_left=-1, int window_right=-1) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // y = x * keep / (1 - p), keep[n] a counter-based hash of (seed, offset, n) >= p * 2^32
  // for the row-major index n of x: a pure function of its arguments, so its own
  // backward (the same mask applied to the gradient) is dropout again.
  m.def("dropout(Tensor x, float p, SymInt seed, SymInt offset, Tensor? rng=None) -> Tensor");
}
