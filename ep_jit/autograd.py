"""Autograd for dispatch and combine, in both layouts: one implementation that
torch.autograd.Function and paddle.autograd.PyLayer both wrap.

- dispatch's backward is a combine of the row gradients: grad_x[t] = sum of the gradients
  of t's rows (fp32), and the weights' gradients travel back with them as per-pair scalars.
- combine's backward moves grad_out along the dispatch's saved layout (a restage: no count
  exchange); in the expert layout grad_y[row] = w[row] * grad_out[t] and
  grad_w[row] = <y[row], grad_out[t]> (fp32), which dispatch's backward brings home.

The engine is what a Buffer offers for this (Buffer itself, or a plain reference with the
same contract); every step it runs is an ep_jit kernel over the Buffer's transport.
"""

from __future__ import annotations

from typing import Any, Protocol

from .frameworks import framework_of
from .transports.base import DispatchResult, Handle


class Engine(Protocol):
    def dispatch_raw(self, x: Any, topk_idx: Any, topk_weights: Any, scales: Any, stream: Any,
                     capacity: int | None, layout: str, pad_multiple: int | None) -> DispatchResult: ...
    def combine_raw(self, y: Any, handle: Handle, stream: Any, weights: bool, scalars: Any) -> tuple[Any, Any]: ...
    def restage(self, g: Any, handle: Handle, stream: Any) -> Any: ...


# ---- framework-neutral tensor steps --------------------------------------------------

def _cast(t: Any, dtype: str) -> Any:
    if framework_of(t) == "torch":
        import torch
        return t.to({"float32": torch.float32, "bf16": torch.bfloat16}[dtype])
    return t.astype({"float32": "float32", "bf16": "bfloat16"}[dtype])


def _zeros_f32(like: Any) -> Any:
    if framework_of(like) == "torch":
        import torch
        return torch.zeros_like(like, dtype=torch.float32)
    import paddle
    return paddle.zeros_like(like, dtype="float32")


def _contiguous(t: Any) -> Any:
    return t if t is None or t.is_contiguous() else t.contiguous()


def needs_grad(*tensors: Any) -> bool:
    """True if autograd is on and any of `tensors` asks for a gradient."""
    for t in tensors:
        if t is None:
            continue
        if framework_of(t) == "torch":
            if t.requires_grad:
                import torch
                if torch.is_grad_enabled():
                    return True
        elif not getattr(t, "stop_gradient", True):
            import paddle
            if paddle.is_grad_enabled():
                return True
    return False


def routed_weights(result: DispatchResult) -> Any:
    """The differentiable weights a dispatch returns: per row (expert) or per row and k (token)."""
    return result.recv_weights if result.handle.layout == "expert" else result.recv_topk_weights


# ---- the one implementation ----------------------------------------------------------

def dispatch_backward(engine: Engine, handle: Handle, stream: Any, grad_recv_x: Any,
                      grad_weights: Any, fp8: bool) -> tuple[Any, Any]:
    """grad_x [T, H] bf16 and grad_topk_weights [T, K] fp32 (None when no weight gradient came).
    After an fp8 dispatch (on every member, as the dtype is) x has no gradient: only the
    weights' gradients move, and grad_x is None."""
    if fp8 and grad_weights is None:  # still collective: zeros, so every member runs the same combine
        grad_weights = _zeros_f32(handle.recv_weights if handle.layout == "expert" else handle.recv_topk_idx)
    rows = None if fp8 else _contiguous(grad_recv_x)
    grad_x, grad_w = engine.combine_raw(rows, handle, stream, False, _contiguous(grad_weights))
    return grad_x, grad_w


def combine_backward(engine: Engine, handle: Handle, stream: Any, y: Any, weights: Any,
                     grad_out: Any) -> tuple[Any, Any]:
    """grad_y [rows, H] bf16 and, in the expert layout, grad_weights [rows] fp32."""
    moved = engine.restage(_contiguous(grad_out), handle, stream)
    if handle.layout == "token":
        return moved, None
    g = _cast(moved, "float32")
    return _cast(g * weights[:, None], "bf16"), (_cast(y, "float32") * g).sum(-1)


def _dispatch_call(engine: Engine, x: Any, topk_weights: Any, call: dict) -> DispatchResult:
    """Run the dispatch a Function's forward records; the result also goes back through `call`."""
    call["result"] = engine.dispatch_raw(x, call["topk_idx"], topk_weights, call["scales"], call["stream"],
                                         call["capacity"], call["layout"], call["pad_multiple"])
    return call["result"]


# ---- torch -------------------------------------------------------------------------

def _torch_functions() -> tuple[type, type]:
    import torch

    class Dispatch(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, topk_weights, engine, call):
            result = _dispatch_call(engine, x, topk_weights, call)
            ctx.engine, ctx.handle, ctx.stream = engine, result.handle, call["stream"]
            ctx.fp8 = result.recv_scales is not None
            if ctx.fp8:
                ctx.mark_non_differentiable(result.recv_x)
            return result.recv_x, routed_weights(result)

        @staticmethod
        def backward(ctx, grad_recv_x, grad_weights):
            grad_x, grad_w = dispatch_backward(ctx.engine, ctx.handle, ctx.stream, grad_recv_x, grad_weights,
                                               ctx.fp8)
            return grad_x, grad_w, None, None

    class Combine(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y, weights, engine, handle, stream):
            out, _ = engine.combine_raw(y, handle, stream, True, None)
            ctx.engine, ctx.handle, ctx.stream = engine, handle, stream
            ctx.save_for_backward(y, weights)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            y, weights = ctx.saved_tensors
            grad_y, grad_w = combine_backward(ctx.engine, ctx.handle, ctx.stream, y, weights, grad_out)
            return grad_y, grad_w, None, None, None

    return Dispatch, Combine


# ---- paddle ------------------------------------------------------------------------

def _paddle_functions() -> tuple[type, type]:
    from paddle.autograd import PyLayer

    class Dispatch(PyLayer):
        @staticmethod
        def forward(ctx, x, topk_weights, engine, call):
            result = _dispatch_call(engine, x, topk_weights, call)
            ctx.engine, ctx.handle, ctx.stream = engine, result.handle, call["stream"]
            ctx.fp8 = result.recv_scales is not None
            ctx.wants = (not x.stop_gradient, not topk_weights.stop_gradient)
            return result.recv_x, routed_weights(result)

        @staticmethod
        def backward(ctx, grad_recv_x, grad_weights):
            grad_x, grad_w = dispatch_backward(ctx.engine, ctx.handle, ctx.stream, grad_recv_x, grad_weights,
                                               ctx.fp8)
            return tuple(g if want else None for g, want in zip((grad_x, grad_w), ctx.wants))

    class Combine(PyLayer):
        @staticmethod
        def forward(ctx, y, weights, engine, handle, stream):
            out, _ = engine.combine_raw(y, handle, stream, True, None)
            ctx.engine, ctx.handle, ctx.stream = engine, handle, stream
            ctx.wants = (not y.stop_gradient, weights is not None and not weights.stop_gradient)
            ctx.save_for_backward(y, weights)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            y, weights = ctx.saved_tensor()
            grads = combine_backward(ctx.engine, ctx.handle, ctx.stream, y, weights, grad_out)
            picked = tuple(g if want else None for g, want in zip(grads, ctx.wants))
            return picked if weights is not None else picked[0]  # one per tensor input

    return Dispatch, Combine


_FUNCTIONS: dict[str, tuple[type, type]] = {}


def _functions(framework: str) -> tuple[type, type]:
    if framework not in _FUNCTIONS:
        _FUNCTIONS[framework] = _torch_functions() if framework == "torch" else _paddle_functions()
    return _FUNCTIONS[framework]


def dispatch(engine: Engine, x: Any, topk_idx: Any, topk_weights: Any, scales: Any, stream: Any,
             capacity: int | None, layout: str, pad_multiple: int | None) -> DispatchResult:
    """engine.dispatch_raw, recorded for autograd: recv_x and the routed weights carry the graph,
    and the handle remembers the weights combine applies (expert layout)."""
    call = dict(topk_idx=topk_idx, scales=scales, stream=stream, capacity=capacity, layout=layout,
                pad_multiple=pad_multiple)
    recv_x, weights = _functions(framework_of(x))[0].apply(x, topk_weights, engine, call)
    result: DispatchResult = call["result"]
    result.handle.weights_node, result.handle.recorded = weights, True
    if layout == "expert":
        return result._replace(recv_x=recv_x, recv_weights=weights)
    return result._replace(recv_x=recv_x, recv_topk_weights=weights)


def combine(engine: Engine, y: Any, handle: Handle, stream: Any) -> Any:
    """engine.combine_raw, recorded for autograd; in the expert layout the weights applied are
    those the dispatch returned, so their gradient flows back to topk_weights."""
    weights = handle.weights_node if handle.layout == "expert" else None
    if weights is None and handle.layout == "expert":
        weights = handle.recv_weights
    handle.recorded = True
    return _functions(framework_of(y))[1].apply(y, weights, engine, handle, stream)
