"""The hybrid's MoSA and dense heads as one op (``ops.triton_hybrid``) against the layer's separate parts and the
float64 plain-torch reference: output and every gradient (x, the router, both parts' weights), eagerly and under
torch.compile, with and without the masked sums, top-k's awkward shapes (k = 2, k = T, batch 1, T not a multiple of
a block), include_first and deterministic scatters; on CPU through Triton's interpreter, and on a GPU also in
bfloat16 and under compiled CUDA graphs."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton_env import DEVICE, DTYPES, eager_and_graphed_steps, require

pytest.importorskip("triton")
import mosa_attention.layers.mosa as layer_module  # noqa: E402
from mosa_attention.layers import MoSAAttention  # noqa: E402
from mosa_attention.ops import triton_hybrid  # noqa: E402
from mosa_attention.ops import triton_mosa  # noqa: E402

require(triton_mosa._qkv_fwd)

# (B, T, MoSA heads, sparsity, include_first, deterministic): masked sums where the heads keep at most half the
# tokens (the first, third and fifth), k = T in the fourth
CASES = [(2, 64, 3, 16, False, None), (1, 37, 5, 4, True, None), (2, 20, 2, 10, False, None), (2, 19, 2, 1, False, None),
         (2, 48, 3, 12, True, True)]
# the op runs where the dense heads' attention kernels take the compute dtype: 16-bit on a GPU
OP_DTYPES = DTYPES if DEVICE == "cpu" else (torch.float16, torch.bfloat16)
ODT = OP_DTYPES[0]
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _run(layer, x, g, compiled=False, hybrid_op=None, monkeypatch=None):
    """(y, x's gradient, every parameter's gradient) of ``layer`` on x, the loss sum(y * g)."""
    if monkeypatch is not None:
        monkeypatch.setattr(layer_module, "HYBRID_OP", hybrid_op)
    torch._dynamo.reset()
    fn = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
    xs = x.clone().requires_grad_()
    y = fn(xs)
    grads = torch.autograd.grad((y.float() * g).sum(), [xs, *layer.parameters()])
    return [y.detach(), *grads]


def _spy(monkeypatch):
    calls = []
    real = triton_hybrid._hybrid_fwd_impl

    def spy(*args):
        calls.append(args[-2])  # masked
        return real(*args)

    monkeypatch.setattr(triton_hybrid, "_hybrid_fwd_impl", spy)
    return calls


@pytest.mark.parametrize("dtype", OP_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}-T{c[1]}-E{c[2]}-s{c[3]}" + ("-first" if c[4] else "")
                                             + ("-det" if c[5] else "") for c in CASES])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_hybrid_op_matches_the_layers_parts_and_the_reference(monkeypatch, dtype, case, compiled):
    B, T, E, sparsity, first, det = case
    torch.manual_seed(T + E)
    layer = MoSAAttention(32, E, sparsity, head_dim=16, num_dense_heads=2, include_first=first, backend="triton",
                          deterministic=det).to(DEVICE, dtype)
    x = torch.randn(B, T, 32, device=DEVICE, dtype=dtype)
    g = torch.randn(B, T, 32, device=DEVICE)
    calls = _spy(monkeypatch)
    got = _run(layer, x, g, compiled, True, monkeypatch)
    assert calls == [layer._masked(x)]  # the one op ran, with the layer's masked-sum choice
    parts = _run(layer, x, g, False, False, monkeypatch)
    assert len(calls) == 1
    # the same kernels as the layer's separate parts: equal up to the atomics' order and the last sum's rounding
    for a, b in zip(got, parts):
        assert _rel(a, b) < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    ref_layer = copy.deepcopy(layer).double()
    ref_layer.backend = ref_layer.dense.backend = "torch"
    want = _run(ref_layer, x.double(), g.double())
    for a, b in zip(got, want):
        assert _rel(a, b) < GRAD_TOL[dtype]


def test_hybrid_op_forced_masked_sums_on_a_shape_that_keeps_most_tokens(monkeypatch):
    # MASKED_SUMS = True on a shape whose heads keep most tokens: the op takes the masked sums (rows-only buffers,
    # their other rows never written) and still gives every value and gradient
    monkeypatch.setattr(layer_module, "MASKED_SUMS", True)
    torch.manual_seed(3)
    layer = MoSAAttention(32, 5, 2, head_dim=16, num_dense_heads=1, backend="triton").to(DEVICE, ODT)
    x, g = torch.randn(2, 24, 32, device=DEVICE, dtype=ODT), torch.randn(2, 24, 32, device=DEVICE)
    calls = _spy(monkeypatch)
    got = _run(layer, x, g, True, True, monkeypatch)
    assert calls == [True]
    want = _run(layer, x, g, False, False, monkeypatch)
    for a, b in zip(got, want):
        assert _rel(a, b) < (1e-5 if ODT == torch.float32 else 2e-3)


def test_hybrid_op_returns_the_selection(monkeypatch):
    torch.manual_seed(5)
    monkeypatch.setattr(layer_module, "HYBRID_OP", True)
    layer = MoSAAttention(32, 3, 8, head_dim=16, num_dense_heads=2, backend="triton").to(DEVICE, ODT)
    x = torch.randn(2, 40, 32, device=DEVICE, dtype=ODT)
    calls = _spy(monkeypatch)
    y, (scores, pos) = layer(x, return_selection=True)
    assert len(calls) == 1
    monkeypatch.setattr(layer_module, "HYBRID_OP", False)
    y2, (scores2, pos2) = layer(x, return_selection=True)
    assert torch.equal(pos, pos2) and torch.equal(scores, scores2)
    assert _rel(y, y2) < (1e-5 if ODT == torch.float32 else 2e-3)


class _OpLog(TorchDispatchMode):
    """The ATen and custom ops that run while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_hybrid_op_backward_makes_no_zero_gradients_for_its_saved_outputs(monkeypatch):
    # the op's forward returns y and eleven tensors kept for the backward (selection, q k v, statistics): autograd
    # must not fill a zero gradient for each before calling the backward (nine fill kernels, ~22 us of a t2 step on
    # an H200, benchmarks/NOTES.md v32); the op's backward gets dy alone
    torch.manual_seed(11)
    monkeypatch.setattr(layer_module, "HYBRID_OP", True)
    layer = MoSAAttention(32, 3, 8, head_dim=16, num_dense_heads=2, backend="triton").to(DEVICE, ODT)
    x = torch.randn(2, 40, 32, device=DEVICE, dtype=ODT, requires_grad=True)
    y = layer(x)
    log = _OpLog()
    with log:
        y.float().sum().backward()
    assert "mosa_attention.hybrid_bwd.default" in log.names
    before = log.names[:log.names.index("mosa_attention.hybrid_bwd.default")]
    assert not [n for n in before if "zero" in n or "fill" in n or "full" in n], before
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_hybrid_op_under_autocast_casts_x_and_keeps_gradient_dtypes(monkeypatch):
    # under autocast over float32 the op takes x and the dense weights in the autocast dtype (the compiled graph
    # holds the casts): the same values as the layer's parts, every gradient in its parameter's dtype
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    torch.manual_seed(7)
    layer = MoSAAttention(32, 3, 16, head_dim=16, num_dense_heads=2, backend="triton")
    x, g = torch.randn(2, 64, 32), torch.randn(2, 64, 32)
    results = {}
    for op in (True, False):
        with torch.autocast("cpu", dtype=torch.float16):
            results[op] = _run(layer, x, g, op, op, monkeypatch)
    for a, b in zip(results[True], results[False]):
        assert a.dtype == b.dtype
        assert _rel(a, b) < 2e-3
    assert all(r.dtype == torch.float32 for r in results[True][1:])


@pytest.mark.parametrize("wide", [True, False], ids=["wide", "cast"])
@pytest.mark.parametrize("case", [(3, 16), (6, 2)], ids=["masked", "whole"])
def test_eager_hybrid_op_under_autocast_takes_x_wide(monkeypatch, wide, case):
    # outside compiled graphs the op takes float32 x and dense weights with their copies (WIDE_INPUT) and makes their
    # gradients in float32 itself; with and without the masked sums (the second case keeps most tokens), the same
    # values as the layer's parts and as the caller's casts, every gradient float32
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    E, sparsity = case
    monkeypatch.setattr(triton_hybrid, "WIDE_INPUT", wide)
    monkeypatch.setattr(triton_mosa, "NARROW_WEIGHTS", True)  # the MoSA weights' copies too (on few rows here)
    from mosa_attention.ops import combine
    casts = []
    real_cast = combine.cast_many
    monkeypatch.setattr(combine, "cast_many", lambda ts, dt: casts.append(len(ts)) or real_cast(ts, dt))
    torch.manual_seed(13 + E)
    layer = MoSAAttention(32, E, sparsity, head_dim=16, num_dense_heads=2, backend="triton")
    x, g = torch.randn(2, 48, 32), torch.randn(2, 48, 32)
    seen = []
    real = triton_hybrid._hybrid_fwd_op

    def spy(x, *args):
        seen.append((x.dtype, args[-3] is None, args[-2] is None))  # x, and whether x / w_qkv_dense had no copy
        return real(x, *args)

    monkeypatch.setattr(triton_hybrid, "_hybrid_fwd_op", spy)
    results = {}
    for op in (True, False):
        with torch.autocast("cpu", dtype=torch.float16):
            results[op] = _run(layer, x, g, False, op, monkeypatch)
    want_masked = layer._masked(x)
    assert want_masked == (E == 3)
    assert seen == [(torch.float32, False, False) if wide else (torch.float16, True, True)]
    # the op: x, both dense weights and both MoSA weights in one launch; the parts: the routed op's launch for the MoSA
    # weights and the router weight (x's copy comes from the dense heads' product)
    assert casts == ([5, 3] if wide else [3])
    for a, b in zip(results[True], results[False]):
        assert a.dtype == b.dtype
        assert _rel(a, b) < 2e-3
    assert results[True][0].dtype == torch.float16
    assert all(r.dtype == torch.float32 for r in results[True][1:])
    ref_layer = copy.deepcopy(layer).double()
    ref_layer.backend = ref_layer.dense.backend = "torch"
    for a, b in zip(results[True], _run(ref_layer, x.double(), g.double())):
        assert _rel(a, b) < GRAD_TOL[torch.float16]


def test_hybrid_op_is_left_to_the_parts_where_it_does_not_apply(monkeypatch):
    monkeypatch.setattr(layer_module, "HYBRID_OP", True)
    x = torch.randn(1, 16, 32, device=DEVICE, dtype=ODT)
    local = MoSAAttention(32, 2, 4, head_dim=16, num_dense_heads=1, dense_kind="local", backend="triton")
    pure = MoSAAttention(32, 2, 4, head_dim=16, backend="triton")
    reference = MoSAAttention(32, 2, 4, head_dim=16, num_dense_heads=1, backend="torch")
    aux = MoSAAttention(32, 2, 4, head_dim=16, num_dense_heads=1, backend="triton", router_aux=True)
    for layer in (local, pure, reference, aux):
        assert not layer.to(DEVICE, ODT)._hybrid_op(x)
    hybrid = MoSAAttention(32, 2, 4, head_dim=16, num_dense_heads=1, backend="triton").to(DEVICE, ODT)
    assert hybrid._hybrid_op(x)
    if DEVICE != "cpu":  # float32 on a GPU: no attention kernel of the op takes it
        assert not hybrid.float()._hybrid_op(x.float())
    monkeypatch.setattr(layer_module, "HYBRID_OP", None)
    assert not hybrid._hybrid_op(x)  # only under torch.compile by default
    monkeypatch.setattr(layer_module, "HYBRID_OP", False)
    assert not hybrid._hybrid_op(x)


def test_the_op_needs_attention_kernels_for_its_dense_heads():
    # FlashAttention's kernels (and cuDNN's): Ampere or later, head dims that are multiples of 8 up to 256
    assert triton_hybrid.attention_kernels_take((9, 0), 64) and triton_hybrid.attention_kernels_take((8, 0), 256)
    assert not triton_hybrid.attention_kernels_take((7, 5), 64)  # a T4
    assert not triton_hybrid.attention_kernels_take((9, 0), 12) and not triton_hybrid.attention_kernels_take((9, 0), 512)


def test_hybrid_triton_names_bad_dense_weights():
    x = torch.randn(1, 16, 32, device=DEVICE)
    wr, wq, wo = torch.randn(2, 32), torch.randn(2, 32, 48), torch.randn(2, 16, 32)
    wr, wq, wo = (t.to(DEVICE) for t in (wr, wq, wo))
    with pytest.raises(ValueError, match="w_o_dense"):
        triton_hybrid.hybrid_triton(x, wr, wq, wo, torch.randn(48, 32, device=DEVICE), torch.randn(32, 32, device=DEVICE),
                                    1, 4, include_first=False, rope_dims=8)
    wqd, wod = torch.randn(48, 32, device=DEVICE), torch.randn(32, 16, device=DEVICE)
    with pytest.raises(ValueError, match="k must be"):
        triton_hybrid.hybrid_triton(x, wr, wq, wo, wqd, wod, 1, 17, include_first=False, rope_dims=8)
    with pytest.raises(ValueError, match="w_o_dense must be on x's device .* dtype"):
        triton_hybrid.hybrid_triton(x, wr, wq, wo, wqd, wod.double(), 1, 4, include_first=False, rope_dims=8)
    with pytest.raises(ValueError, match="w_router must be"):
        triton_hybrid.hybrid_triton(x, wr[:1], wq, wo, wqd, wod, 1, 4, include_first=False, rope_dims=8)
    with pytest.raises(ValueError, match="rope_dims"):
        triton_hybrid.hybrid_triton(x, wr, wq, wo, wqd, wod, 1, 4, include_first=False, rope_dims=18)


@pytest.mark.parametrize("kind", ["cudnn", "flash"])
def test_hybrid_op_on_either_attention_kernel(monkeypatch, kind):
    # the dense heads' attention through cuDNN's kernels or FlashAttention's, whichever SDPA would pick: both give
    # the layer's values and gradients
    if DEVICE == "cpu":
        pytest.skip("the GPU's attention kernels")
    monkeypatch.setattr(triton_hybrid, "_attention_kind", lambda q: kind)
    torch.manual_seed(9)
    layer = MoSAAttention(128, 6, 8, head_dim=64, num_dense_heads=3, backend="triton").to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 256, 128, device=DEVICE, dtype=torch.bfloat16)
    g = torch.randn(2, 256, 128, device=DEVICE)
    calls = _spy(monkeypatch)
    got = _run(layer, x, g, False, True, monkeypatch)
    assert len(calls) == 1
    want = _run(layer, x, g, False, False, monkeypatch)
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hybrid_op_under_compiled_cuda_graphs_matches_eager(monkeypatch, dtype):
    # torch.compile(mode="reduce-overhead"): the op's two streams inside the recorded CUDA graphs; every step, fresh
    # inputs, gives the eager layer's output and gradients (which runs its own two streams)
    if DEVICE == "cpu":
        pytest.skip("CUDA graphs")
    calls = _spy(monkeypatch)
    for heads, sparsity in ((17, 32), (40, 8)):  # masked sums, then not
        torch.manual_seed(heads)
        eager = MoSAAttention(128, heads, sparsity, head_dim=64, num_dense_heads=4, backend="triton").to(DEVICE, dtype)
        for step, (want, got) in enumerate(eager_and_graphed_steps(eager, (4, 512, 128), dtype)):
            for a, b in zip(got, want):
                assert _rel(a, b) < (1e-2 if dtype == torch.bfloat16 else 2e-3), (heads, step)
        assert calls and calls[-1] == (heads == 17)  # the compiled layer ran the op, masked where few are kept


@pytest.mark.parametrize("autocast,wide", [(False, True), (True, True), (True, False)],
                         ids=["bf16", "autocast", "autocast-parts"])
def test_a_captured_hybrid_layer_takes_the_op(monkeypatch, autocast, wide):
    # HYBRID_OP None: eager steps run the layer's parts; a CUDA-graph capture of the same eager layer runs the one
    # op (its MoSA heads adding into the dense heads' y), under autocast over wider x too (the op taking x and the
    # dense weights wide) unless CAPTURED_WIDE is off; the replay gives the eager step's output and gradients, in
    # the same dtypes
    if DEVICE == "cpu":
        pytest.skip("CUDA graphs")
    from mosa_attention.bench.layer import make_step
    monkeypatch.setattr(layer_module, "CAPTURED_WIDE", wide)
    calls = _spy(monkeypatch)
    torch.manual_seed(13)
    dt = torch.float32 if autocast else torch.bfloat16
    layer = MoSAAttention(128, 17, 32, head_dim=64, num_dense_heads=4, backend="triton").to(DEVICE, dt)
    x = torch.randn(4, 512, 128, device=DEVICE, dtype=dt, requires_grad=True)
    dy = torch.randn(4, 512, 128, device=DEVICE, dtype=dt)
    plain = make_step(layer, x, dy)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return plain()
    want = [step().detach().clone(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    side = torch.cuda.Stream()  # warm-up off the default stream, as captures need
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    assert calls == []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    assert calls == ([True] if wide else [])  # the captured step only
    graph.replay()
    torch.cuda.synchronize()
    got = [y, x.grad, *(p.grad for p in layer.parameters())]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        assert _rel(a, b) < 1e-2


@pytest.mark.parametrize("buffer", ["float32", "scaled_float16"])
def test_hybrid_op_adds_unfinished_buffers_into_the_dense_heads_results(monkeypatch, buffer):
    # where the MoSA heads' scatters add into a buffer other than the result (a float32 one, or y's scaled float16
    # one) and the sums are not masked, the op adds that buffer into the dense heads' y and x's gradient in one pass
    # (SUM_UNFINISHED): the values of the convert-then-sum form and of the float64 reference
    if DEVICE != "cpu":
        pytest.skip("forced buffers under the interpreter (the card's own plan runs in the GPU tests)")
    dtype = torch.float16 if buffer == "float32" else torch.float32
    if buffer == "float32":
        monkeypatch.setattr(triton_mosa, "NARROW_ATOMICS", False)  # float16 results add into float32 buffers
    else:
        monkeypatch.setattr(triton_mosa, "SCALED_HALF_ATOMICS", True)  # a float32 y adds into the scaled buffer
    monkeypatch.setattr(layer_module, "MASKED_SUMS", False)
    added = []
    real = triton_hybrid.add_unfinished
    monkeypatch.setattr(triton_hybrid, "add_unfinished",
                        lambda dst, part: (added.append((part.buf.dtype, part.stats is not None)), real(dst, part))[1])
    torch.manual_seed(17)
    layer = MoSAAttention(32, 4, 4, head_dim=16, num_dense_heads=2, backend="triton").to(DEVICE, dtype)
    x, g = torch.randn(2, 24, 32, device=DEVICE, dtype=dtype), torch.randn(2, 24, 32, device=DEVICE)
    got = _run(layer, x, g, False, True, monkeypatch)
    if buffer == "float32":  # y's and x's gradient's float32 buffers
        assert added == [(torch.float32, False), (torch.float32, False)]
    else:  # y's scaled buffer (x's gradient keeps float32, which is x's own dtype here: added in place)
        assert added == [(torch.float16, True)]
    monkeypatch.setattr(triton_hybrid, "SUM_UNFINISHED", False)
    converted = _run(layer, x, g, False, True, monkeypatch)
    assert len(added) == (2 if buffer == "float32" else 1)
    for a, b in zip(got, converted):  # one rounding fewer: equal to the 16-bit result's precision
        assert _rel(a, b) < (2e-3 if dtype == torch.float16 else 1e-5)
    ref_layer = copy.deepcopy(layer).double()
    ref_layer.backend = ref_layer.dense.backend = "torch"
    want = _run(ref_layer, x.double(), g.double())
    for a, b in zip(got, want):
        assert _rel(a, b) < GRAD_TOL[dtype]
