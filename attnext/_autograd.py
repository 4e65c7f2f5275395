"""Derivatives of attnext's ops: one autograd.Function per op, registered as the op's
Autograd kernel, with every rule torch's transforms ask for.

``torch.library.register_autograd`` gives an op reverse mode only: its generated
Function has no ``jvp`` (forward-mode AD and ``torch.func.jvp`` got silent zeros) and
no ``setup_context`` staticmethod (``torch.func.grad``/``jacrev`` raised). Here each op
gets a Function with

* ``forward``: the op itself, below autograd (the native kernel, or the fake kernel
  under ``torch.compile``);
* ``setup_context`` / ``backward``: reverse mode, as ``register_autograd`` had it;
* ``jvp``: forward mode (``torch.func.jvp``, ``jacfwd``, ``hessian``,
  ``torch.autograd.forward_ad``);
* ``vmap``: a batching rule (``torch.func.vmap``, ``jacrev``, ``jacfwd``), which either
  folds the vmapped dim into the op's leading batch dims (one call) or, where that
  would change the result (a dropout mask hashed from the batch index), calls the op
  once per slice.

The per-op rules live beside each op in :mod:`attnext.ops`; this module holds only the
machinery. Inference calls that need no derivative skip the Function entirely.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
from torch.autograd import forward_ad as _fwAD

_lib = torch.library.Library("attnext", "IMPL")  # noqa: TOR901  (kept alive for the module's lifetime)
FUNCTIONS = {}  # op name -> its autograd.Function (for tests and introspection)
_OPS = {}  # op name -> its OpOverload (looked up once)


def _fill_defaults(schema, args):
    """The dispatcher drops trailing arguments equal to their defaults; put them back."""
    n = len(schema.arguments)
    if len(args) >= n:
        return tuple(args)
    return tuple(args) + tuple(a.default_value for a in schema.arguments[len(args):])


def _any_requires_grad_py(*args) -> bool:
    """torch._C._any_requires_grad for torch versions without it (2.5): any tensor argument,
    also inside a list or tuple, that requires grad."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)) and _any_requires_grad_py(*a):
            return True
    return False


_any_requires_grad = getattr(torch._C, "_any_requires_grad", _any_requires_grad_py)


def needs_derivatives(args) -> bool:
    """Whether a call on ``args`` must go through the op's autograd.Function: a reverse-mode
    graph is being recorded, a forward-mode dual level is open, or a torch.func transform
    is active (it routes the Function through its own rules)."""
    if _fwAD._current_level >= 0:
        return True
    return torch.is_grad_enabled() and _any_requires_grad(*args)


def derivative_context() -> bool:
    """Whether a call with no input requiring grad may still need derivatives: a
    forward-mode dual level is open or a torch.func transform is active."""
    return _fwAD._current_level >= 0 or (
        not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()
    )


def save_for_forward(ctx, *tensors) -> None:
    """ctx.save_for_forward, where a forward-mode derivative can be asked for (a dual
    level is open or a torch.func transform is active); a plain training step skips it."""
    if _fwAD._current_level >= 0 or torch._C._are_functorch_transforms_active():
        ctx.save_for_forward(*tensors)


def higher_order_requested(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a backward now running will itself be differentiated.

    True when autograd records the backward (``create_graph=True``: the engine runs the
    backward in grad mode), when a forward-mode level is open (forward-over-reverse),
    or under a torch.func transform (``grad(grad(f))``, ``jacfwd(jacrev(f))``,
    ``vmap`` over a backward). A backward without a derivative of its own (the fused
    attention's native kernel) takes a differentiable path then.
    """
    if torch.is_grad_enabled() or _fwAD._current_level >= 0 or torch._C._are_functorch_transforms_active():
        return True
    return False


def register(
    name: str,
    *,
    setup_context: Callable,
    backward: Callable,
    jvp: Callable,
    vmap: Callable,
) -> None:
    """Installs the Autograd kernel of ``attnext::<name>``: an autograd.Function built from
    the given rules (signatures as ``torch.autograd.Function``'s staticmethods)."""
    op = getattr(torch.ops.attnext, name).default
    schema = op._schema

    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    fn = type(
        f"attnext_{name.lstrip('_')}_Function",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
            "vmap": staticmethod(vmap),
        },
    )
    FUNCTIONS[name] = fn

    def autograd_kernel(*args):
        args = _fill_defaults(schema, args)
        if torch._C._are_functorch_transforms_active():
            # Reached from inside a transform's own dispatch, where an autograd.Function
            # cannot start: the public functions (and call()) enter above the dispatcher.
            raise RuntimeError(
                f"attnext: under torch.func transforms call the public function (attnext.{name.lstrip('_')} "
                f"or attnext.ops.call({name!r}, ...)), not torch.ops.attnext.{name} directly"
            )
        if needs_derivatives(args):
            return fn.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _lib.impl(name, autograd_kernel, "Autograd")


def call(name: str, *args):
    """Runs ``attnext::<name>`` on ``args`` (every argument, positionally) with its derivatives.

    The public functions (and the derivative rules) enter here, above the dispatcher:
    under a torch.func transform the op's Function must be applied from here (it
    cannot be started from inside an Autograd kernel there); otherwise entering the
    Function (or, with nothing to differentiate, the kernel below autograd) directly
    saves the Autograd kernel's Python wrapper on every call. Under torch.compile this
    is the plain op call, which the graph records.
    """
    op = _OPS.get(name)
    if op is None:
        op = _OPS[name] = getattr(torch.ops.attnext, name).default
    if torch.compiler.is_compiling():
        return op(*args)
    fn = FUNCTIONS.get(name)
    if fn is None:
        return op(*args)
    if torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    if needs_derivatives(args):
        # Function.apply binds the arguments to forward's signature on every call when
        # setup_context is defined (inspect.signature: several microseconds); forward
        # takes *args, so the binding is the identity and the C++ apply runs directly.
        return _apply(fn, *_unwrap_dead_wrappers(args))
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _apply(fn, *args):
    return super(torch.autograd.Function, fn).apply(*args)


# ----------------------------------------------------------------------------- vmap helpers


def move_to_front(x: Optional[torch.Tensor], bdim: Optional[int], batch_size: int) -> Optional[torch.Tensor]:
    """``x`` with its vmapped dim first; an unbatched ``x`` expanded to ``batch_size`` (a view)."""
    if x is None:
        return None
    if bdim is None:
        return x.unsqueeze(0).expand(batch_size, *x.shape)
    return x.movedim(bdim, 0)


def vmap_fold(info, in_dims: Sequence, args: Sequence, name: str):
    """Batching rule for ops whose tensor arguments all share their leading batch dims:
    the vmapped dim becomes one more leading batch dim of ``attnext::<name>``, one call,
    outputs batched at 0."""
    moved = [move_to_front(a, d, info.batch_size) if isinstance(a, torch.Tensor) else a for a, d in zip(args, in_dims)]
    out = call(name, *moved)
    return out, (tuple(0 for _ in out) if isinstance(out, tuple) else 0)


def vmap_loop(info, in_dims: Sequence, args: Sequence, name: str):
    """Batching rule that calls ``attnext::<name>`` once per slice and stacks: exact
    per-slice semantics where folding would change a result (a dropout mask hashed from
    the batch index, matmul's vector operands)."""
    if info.batch_size == 0:
        raise RuntimeError(f"attnext: vmap over a dim of size 0 is not supported by attnext::{name} with these arguments")
    outs = []
    for i in range(info.batch_size):
        sliced = [a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a for a, d in zip(args, in_dims)]
        outs.append(call(name, *sliced))
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(list(o)) for o in zip(*outs)), tuple(0 for _ in outs[0])
    return torch.stack(outs), 0
