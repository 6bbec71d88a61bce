"""The dense heads' fused split + RoPE kernel against the plain-torch ops, on CPU through the interpreter."""
import pytest
import torch
from triton_env import DEVICE, DTYPES, TOL, require

pytest.importorskip("triton")
from mosa_attention.layers import DenseAttention, LocalAttention  # noqa: E402
from mosa_attention.ops import triton_rope  # noqa: E402
from mosa_attention.ops.attention import project_qkv  # noqa: E402

require(triton_rope._split_rope)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,h,H,D,rope_dims", [
    (2, 37, 48, 3, 32, 16),   # T off the block, rope on half
    (1, 5, 32, 2, 64, 64),    # batch 1, full rotation
    (2, 20, 32, 1, 24, 0),    # no rope, head dim off a power of two
    (1, 40, 32, 2, 40, 10),   # odd rope split
])
def test_matches_torch_ops(B, T, h, H, D, rope_dims, dtype):
    x = torch.randn(B, T, h, dtype=dtype, device=DEVICE)
    w = (torch.randn(3 * H * D, h) / h ** 0.5).to(dtype).to(DEVICE)
    xs = [x.clone().requires_grad_(), x.double().requires_grad_()]
    ws = [w.clone().requires_grad_(), w.double().requires_grad_()]
    got = project_qkv(xs[0], ws[0], H, rope_dims, 10000.0, backend="triton")
    want = project_qkv(xs[1], ws[1], H, rope_dims, 10000.0, backend="torch")
    tol = TOL[dtype]
    for a, b in zip(got, want):
        assert a.shape == (B, H, T, D) and a.dtype == dtype
        assert ((a.double() - b).norm() / b.norm()).item() < tol
    gs = [torch.randn(B, H, T, D, device=DEVICE, dtype=dtype) for _ in range(3)]
    torch.autograd.backward(got, gs)
    torch.autograd.backward(want, [g.double() for g in gs])
    for a, b in ((xs[0].grad, xs[1].grad), (ws[0].grad, ws[1].grad)):
        assert ((a.double() - b).norm() / b.norm()).item() < tol


def test_strided_projection_is_read_in_place():
    # the projection may be the first columns of a wider product (a hybrid's dense q, k, v beside the MoSA
    # router logits): rows strided over B and T, unit stride along the features
    B, T, h, H, D = 2, 37, 32, 2, 32
    x = torch.randn(B, T, h, device=DEVICE)
    w = torch.randn(3 * H * D + 5, h, device=DEVICE) / h ** 0.5
    wide = (x @ w.t()).requires_grad_()
    qkv = wide[..., :3 * H * D]
    assert not qkv.is_contiguous()
    got = triton_rope.split_rope_triton(qkv, H, 16, 10000.0)
    ref = qkv.detach().contiguous().requires_grad_()
    want = triton_rope.split_rope_triton(ref, H, 16, 10000.0)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    gs = [torch.randn(B, H, T, D, device=DEVICE) for _ in range(3)]
    torch.autograd.backward(got, gs)
    torch.autograd.backward(want, gs)
    assert torch.equal(wide.grad[..., :3 * H * D], ref.grad) and not wide.grad[..., 3 * H * D:].any()


@pytest.mark.parametrize("grad_layout", ["head-major", "token-major", "strided"])
def test_token_major_views_and_gradients_of_any_layout(grad_layout):
    # q, k, v are [B, H, T, D] views of token-major memory (SDPA keeps that layout, so its output reshapes
    # to [B, T, H * D] without a copy); the backward reads gradients in whatever (B, H, T) strides they come
    B, T, h, H, D = 2, 19, 32, 3, 16
    x = torch.randn(B, T, h, device=DEVICE)
    w = torch.randn(3 * H * D, h, device=DEVICE) / h ** 0.5
    xs = [x.clone().requires_grad_(), x.double().requires_grad_()]
    got = project_qkv(xs[0], w, H, 8, 10000.0, backend="triton")
    want = project_qkv(xs[1], w.double(), H, 8, 10000.0, backend="torch")
    for t in got:
        assert t.shape == (B, H, T, D) and t.transpose(1, 2).is_contiguous()
    gs = [torch.randn(B, H, T, D, device=DEVICE) for _ in range(3)]
    if grad_layout == "token-major":
        gs = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in gs]
    elif grad_layout == "strided":  # every other element of a wider buffer along T
        gs = [torch.randn(B, H, 2 * T, D, device=DEVICE)[:, :, ::2] for _ in range(3)]
    torch.autograd.backward(got, gs)
    torch.autograd.backward(want, [g.double() for g in gs])
    assert ((xs[0].grad.double() - xs[1].grad).norm() / xs[1].grad.norm()).item() < 1e-5


def test_unused_output_gets_no_gradient():
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(3 * 2 * 32, 16, device=DEVICE)
    q, k, v = project_qkv(x, w, 2, 16, 10000.0, backend="triton")
    (q.sum() + v.sum()).backward()  # k unused: its gradient is None in the backward
    x2 = x.detach().clone().requires_grad_()
    q2, k2, v2 = project_qkv(x2, w, 2, 16, 10000.0, backend="torch")
    (q2.sum() + v2.sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unused", [None, 1], ids=["all-used", "k-unused"])
def test_compiled_graph_calls_the_kernel_as_custom_ops(unused):
    # under torch.compile the split + RoPE stays one node each way (mosa_attention::split_rope_fwd / _bwd), whose
    # values and gradients equal the eager kernel's bit for bit and the plain-torch ops' to rounding
    torch._dynamo.reset()
    B, T, h, H, D = 2, 21, 32, 3, 16
    x = torch.randn(B, T, h, device=DEVICE)
    w = torch.randn(3 * H * D, h, device=DEVICE) / h ** 0.5
    gs = [torch.randn(B, H, T, D, device=DEVICE) for _ in range(3)]
    graphs = []

    def keep(gm, inputs):  # a backend that records the traced graph and runs it as it is
        graphs.append(str(gm.graph))
        return gm.forward

    def loss(xx, backend):
        q, k, v = project_qkv(xx, w, H, 8, 10000.0, backend=backend)
        return sum((t * g).sum() for i, (t, g) in enumerate(zip((q, k, v), gs)) if i != unused)

    results = []
    for fn, backend in ((torch.compile(loss, backend=keep, fullgraph=True), "triton"),
                        (torch.compile(loss, backend="aot_eager", fullgraph=True), "triton"),
                        (loss, "triton"), (loss, "torch")):
        xx = x.clone().requires_grad_()
        out = fn(xx, backend)
        results.append((out.detach(), *torch.autograd.grad(out, xx)))
    assert "mosa_attention.split_rope_fwd" in graphs[0]
    for got in results[1:3]:
        for a, b in zip(results[0], got):
            assert torch.equal(a, b)
    for a, b in zip(results[0], results[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [DenseAttention, LocalAttention])
def test_layers_match_torch_backend(cls):
    torch.manual_seed(3)
    kw = dict(window=7) if cls is LocalAttention else {}
    fast, ref = cls(48, 3, head_dim=32, backend="triton", **kw), cls(48, 3, head_dim=32, backend="torch", **kw)
    ref.load_state_dict(fast.state_dict())
    fast, ref = fast.to(DEVICE), ref.to(DEVICE)
    x = torch.randn(2, 29, 48, device=DEVICE)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y, y_ref = fast(xs[0]), ref(xs[1])
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.W_QKV.weight.grad, ref.W_QKV.weight.grad, rtol=1e-5, atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="backend='fast'"):
        DenseAttention(32, 2, backend="fast")
    with pytest.raises(ValueError, match="rope_dims"):
        triton_rope.split_rope_triton(torch.randn(1, 4, 3 * 2 * 8, device=DEVICE), 2, 3, 10000.0)
    with pytest.raises(ValueError, match="qkv.shape"):
        triton_rope.split_rope_triton(torch.randn(1, 4, 50, device=DEVICE), 2, 4, 10000.0)
    with pytest.raises(ValueError, match="qkv.dtype=torch.int64"):
        triton_rope.split_rope_triton(torch.ones(1, 4, 48, dtype=torch.long, device=DEVICE), 2, 4, 10000.0)
    with pytest.raises(ValueError, match="n_heads=0"):
        triton_rope.split_rope_triton(torch.randn(1, 4, 48, device=DEVICE), 0, 4, 10000.0)
    with pytest.raises(ValueError, match="rope_base=0.0"):
        triton_rope.split_rope_triton(torch.randn(1, 4, 48, device=DEVICE), 2, 4, 0.0)


def test_rope_tables_match_the_reference_and_are_kept():
    from mosa_attention.ops.rope import rope_cos_sin
    from mosa_attention.ops.triton_rope import _OUTGROWN, _TABLES, rope_tables
    cos, sin = rope_tables(32, 10000.0, 40, DEVICE)
    ref_cos, ref_sin = rope_cos_sin(torch.arange(40, device=DEVICE), 32, 10000.0, torch.float32)
    torch.testing.assert_close(cos[:40], ref_cos[:, :16], rtol=0, atol=0)  # (the reference repeats the half)
    torch.testing.assert_close(sin[:40], ref_sin[:, :16], rtol=0, atol=0)
    assert rope_tables(32, 10000.0, 40, DEVICE)[0] is cos  # cached: no work in later steps
    assert rope_tables(32, 10000.0, cos.shape[0] + 1, DEVICE)[0].shape[0] > cos.shape[0]  # grown on demand
    assert any(t[0] is cos for t in _OUTGROWN)  # the outgrown one is kept: kernels may still read it
    _TABLES.clear()


def test_cache_entries_are_made_in_a_thread_of_their_own():
    import threading
    from mosa_attention.ops._host import in_own_thread
    assert in_own_thread(threading.get_ident) != threading.get_ident()

    def fails():
        raise ValueError("raised there")
    with pytest.raises(ValueError, match="raised there"):
        in_own_thread(fails)
