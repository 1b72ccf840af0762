"""The autograd wiring without a GPU: paddle.autograd.PyLayer (the CPU build) over the one
implementation in ep_jit/autograd.py, driven by a plain single-member reference engine
with the Buffer's contract, against paddle's own autograd of the dense layer."""

import pytest

paddle = pytest.importorskip("paddle")

from ep_jit import autograd  # noqa: E402
from ep_jit.transports.base import DispatchResult, Handle  # noqa: E402


class ReferenceEngine:
    """dispatch_raw / combine_raw / restage of one member, in paddle on the CPU: token layout
    (one row per token that picks an expert) or expert layout (one row per pair, padded)."""

    def __init__(self, num_experts: int, fp8: bool = False):
        self.E, self.fp8 = num_experts, fp8  # fp8: results carry (dummy) scales, as an fp8 dispatch's do

    def dispatch_raw(self, x, topk_idx, topk_weights, scales, stream, capacity, layout, pad_multiple):
        idx, T, K = topk_idx.numpy(), x.shape[0], topk_idx.shape[1]
        h = Handle(0, "paddle", T, None, None, 0, None, None, layout=layout)
        if layout == "token":
            h.rows_of = [t for t in range(T) if (idx[t] >= 0).any()]
            h.capacity = len(h.rows_of)
            h.recv_topk_idx = paddle.to_tensor(idx[h.rows_of])
            rows = paddle.to_tensor(h.rows_of, dtype="int64")
            recv_w = paddle.where(h.recv_topk_idx >= 0, topk_weights.detach()[rows], paddle.zeros([1]))
            return DispatchResult(x.detach()[rows], h.recv_topk_idx, recv_w, self._scales(h), None, h)
        h.pairs, offsets = [], [0]
        for e in range(self.E):
            found = [(t, k) for t in range(T) for k in range(K) if idx[t, k] == e]
            h.pairs += [(offsets[-1] + i, t, k) for i, (t, k) in enumerate(found)]
            offsets.append(-(-(offsets[-1] + len(found)) // pad_multiple) * pad_multiple)
        h.capacity = offsets[-1]
        recv_x = paddle.zeros([h.capacity, x.shape[1]], dtype=x.dtype)
        recv_w = paddle.zeros([h.capacity], dtype="float32")
        for row, t, k in h.pairs:
            recv_x[row], recv_w[row] = x.detach()[t], topk_weights.detach()[t, k]
        h.recv_weights = recv_w
        return DispatchResult(recv_x, None, None, self._scales(h), None, h, recv_w, paddle.to_tensor(offsets))

    def _scales(self, h):
        return paddle.ones([h.capacity, 1]) if self.fp8 else None

    def combine_raw(self, y, h, stream, weights, scalars):
        self.rows_moved = y is not None
        rows = y if y is not None else paddle.zeros([h.capacity, 1], dtype="bfloat16")  # None: the scalars alone
        out = paddle.zeros([h.num_tokens, rows.shape[1]], dtype="float32")
        gw = paddle.zeros([h.num_tokens, h.recv_topk_idx.shape[1] if h.layout == "token" else 2], dtype="float32")
        if h.layout == "token":
            for j, t in enumerate(h.rows_of):
                out[t] += rows[j].astype("float32")
                if scalars is not None:
                    gw[t] = paddle.where(h.recv_topk_idx[j] >= 0, scalars[j], paddle.zeros([1]))
        else:
            for row, t, k in h.pairs:
                w = h.recv_weights[row] if weights else 1.0
                out[t] += w * rows[row].astype("float32")
                if scalars is not None:
                    gw[t, k] = scalars[row]
        return out.astype("bfloat16") if y is not None else None, gw if scalars is not None else None

    def restage(self, g, h, stream):
        moved = paddle.zeros([h.capacity, g.shape[1]], dtype="bfloat16")
        for row, t in (enumerate(h.rows_of) if h.layout == "token" else ((r, t) for r, t, _ in h.pairs)):
            moved[row] = g[t]
        return moved


def dense(x, idx, w, W, g):
    """out[t] = sum_k w[t, k] * x[t] @ W[idx[t, k]] in fp32, and the loss <out, g>."""
    out = 0
    for k in range(idx.shape[1]):
        out = out + w[:, k:k + 1] * paddle.einsum("th,thj->tj", x, W[idx[:, k]])
    return (out * g).sum()


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("layout, pad", [("expert", 4), ("expert", 1), ("token", None)])
def test_pylayer_backward_matches_dense_autograd(layout, pad, x_grad):
    """x_grad False: the weights alone want a gradient, as after an fp8 dispatch, and only
    they move (the engine's results carry scales, as an fp8 dispatch's do)."""
    paddle.seed(0)
    T, H, E, K = 6, 16, 4, 2
    engine = ReferenceEngine(E, fp8=not x_grad)
    x0 = paddle.randn([T, H]).astype("bfloat16").astype("float32")
    idx = paddle.to_tensor([[0, 1], [2, 2], [3, -1], [1, 0], [-1, -1], [2, 3]], dtype="int64")
    w0, W, g = paddle.rand([T, K]), paddle.randn([E, H, H]) / 4, paddle.randn([T, H])
    w0 = paddle.where(idx >= 0, w0, paddle.zeros([1]))

    x = x0.astype("bfloat16")
    x.stop_gradient = not x_grad
    w = w0.clone()
    w.stop_gradient = False
    res = autograd.dispatch(engine, x, idx, w, None, None, None, layout, pad)
    if layout == "expert":
        offsets = res.expert_offsets.numpy().tolist()
        y = paddle.concat([paddle.matmul(res.recv_x[offsets[e]:offsets[e + 1]].astype("float32"), W[e])
                           for e in range(E)]).astype("bfloat16")
    else:
        xf, y = res.recv_x.astype("float32"), 0
        for e in range(E):
            y = y + (res.recv_topk_weights * (res.recv_topk_idx == e).astype("float32")).sum(1, keepdim=True) * \
                paddle.matmul(xf, W[e])
        y = y.astype("bfloat16")
    out = autograd.combine(engine, y, res.handle, None)
    (out.astype("float32") * g).sum().backward()

    xr, wr = x0.clone(), w0.clone()
    xr.stop_gradient = wr.stop_gradient = False
    dense(xr, paddle.clip(idx, min=0), wr * (idx >= 0).astype("float32"), W, g).backward()
    mask = (idx >= 0).astype("float32")
    if x_grad:
        assert paddle.allclose(x.grad.astype("float32"), xr.grad, rtol=3e-2, atol=3e-2 * float(xr.grad.abs().max()))
    else:
        assert x.grad is None and not engine.rows_moved  # dispatch's backward moved the scalars alone
    assert paddle.allclose(w.grad * mask, wr.grad * mask, rtol=3e-2, atol=3e-2 * float(wr.grad.abs().max()))


def test_needs_grad_follows_paddle_stop_gradient():
    t = paddle.ones([2])
    assert not autograd.needs_grad(t, None)
    t.stop_gradient = False
    assert autograd.needs_grad(t)
    with paddle.no_grad():
        assert not autograd.needs_grad(t)
