"""Triton MoSA kernels against the plain-torch reference, on CPU through Triton's interpreter.

Output and every gradient (x, scores, w_qkv, w_o), float32 and float16 (bf16 dots are broken in the
interpreter), small shapes: k = 2, k = T, T not a multiple of the block, batch 1, padding slots, unsorted
positions, head dims 32 and 64, several blocks per sequence.
"""
import pytest
import torch
from triton_env import DEVICE, DTYPES, TOL, eager_and_graphed_steps, require

pytest.importorskip("triton")
from mosa_attention.ops.mosa import sparse_attention_reference  # noqa: E402
from mosa_attention.ops import triton_mosa  # noqa: E402
from mosa_attention.ops.triton_mosa import sparse_attention_triton  # noqa: E402

require(triton_mosa._qkv_fwd)


def _inputs(B, T, h, E, k, D, dtype, pad=0, unsorted=False, repeat=()):
    x = torch.randn(B, T, h, dtype=dtype)
    scores = torch.rand(B, E, k, dtype=dtype)
    idx = torch.stack([torch.stack([torch.randperm(T)[:k].sort().values for _ in range(E)]) for _ in range(B)])
    if pad:
        idx[..., k - pad:] = T
    for j in repeat:  # a position kept twice (the reference allows it): slot j repeats slot j - 1
        idx[..., j] = idx[..., j - 1]
    if unsorted:
        idx = idx[..., torch.randperm(k)]
    w_qkv = torch.randn(E, h, 3 * D, dtype=dtype) / h ** 0.5
    w_o = torch.randn(E, D, h, dtype=dtype) / D ** 0.5
    return [t.to(DEVICE) for t in (x, scores, idx, w_qkv, w_o)]


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _compare(B, T, h, E, k, D, rope_dims, dtype, pad=0, unsorted=False, repeat=(), deterministic=None,
             tol=None, w_o_scale=1.0, beside=False):
    x, scores, idx, w_qkv, w_o = _inputs(B, T, h, E, k, D, dtype, pad, unsorted, repeat)
    w_o = w_o * w_o_scale
    leaves = [t.clone().requires_grad_() for t in (x, scores, w_qkv, w_o)]
    y = sparse_attention_triton(leaves[0], leaves[1], idx, leaves[2], leaves[3], rope_dims, 10000.0,
                                deterministic=deterministic, beside=beside)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, scores, w_qkv, w_o)]
    y_ref = sparse_attention_reference(ref_leaves[0], ref_leaves[1], idx, ref_leaves[2], ref_leaves[3], rope_dims, 10000.0)
    y_ref.backward(dy.double())
    assert y.dtype == dtype and y.shape == (B, T, h)
    errs = {"y": _rel(y, y_ref)}
    errs.update({n: _rel(a.grad, b.grad) for n, a, b in zip(("x", "scores", "w_qkv", "w_o"), leaves, ref_leaves)})
    assert all(e < (tol or TOL[dtype]) for e in errs.values()), errs


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,T,h,E,k,D,rope_dims,pad,unsorted",
    [
        (2, 40, 48, 3, 17, 32, 16, 0, False),  # T, k off the block size, rope on half the dims
        (1, 20, 32, 2, 2, 32, 16, 0, False),  # k = 2, batch 1
        (2, 20, 32, 2, 20, 64, 64, 0, False),  # k = T, full rotation, head dim 64
        (2, 30, 32, 2, 10, 64, 0, 3, False),  # padding slots, no rope
        (2, 30, 32, 2, 10, 32, 16, 2, True),  # unsorted positions with padding
        (1, 150, 32, 2, 100, 32, 16, 0, False),  # several key blocks per sequence
    ],
)
def test_matches_reference(B, T, h, E, k, D, rope_dims, pad, unsorted, dtype, deterministic):
    # both scatter-add modes: float32 atomics into [B, T, h], and the rows + sorted segment sum
    _compare(B, T, h, E, k, D, rope_dims, dtype, pad, unsorted, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_unsorted_multiblock(deterministic):
    _compare(1, 150, 32, 2, 100, 32, 16, torch.float32, pad=5, unsorted=True, deterministic=deterministic)


def test_repeated_positions_across_block_boundaries():
    # ascending but not strictly: the block-skipping fast path must not be taken (32- and 64-row blocks)
    _compare(1, 200, 32, 2, 100, 32, 16, torch.float32, repeat=(32, 64))
    _compare(1, 200, 32, 2, 100, 32, 16, torch.float16, repeat=(64,))


def test_odd_head_dim():
    _compare(2, 50, 40, 3, 33, 24, 10, torch.float32)


def test_bitwise_repeatable():
    x, scores, idx, w_qkv, w_o = _inputs(2, 30, 32, 2, 10, 32, torch.float32)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, scores, w_qkv, w_o)]
        y = sparse_attention_triton(leaves[0], leaves[1], idx, leaves[2], leaves[3], 16, deterministic=True)
        y.sum().backward()
        runs.append([y.detach()] + [t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_scatter_mode_choice(monkeypatch):
    # True: rows + segment sum (counted by calls to the destination sort); False: atomics; None: rows under
    # torch.use_deterministic_algorithms, else atomics, except rows where the atomics would go through a
    # float32 buffer and the kept rows are few next to T
    calls = []
    real = triton_mosa._segments
    monkeypatch.setattr(triton_mosa, "_segments", lambda *a: calls.append(1) or real(*a))

    def run(det, k, E=2, dtype=torch.float32):
        x, scores, idx, w_qkv, w_o = _inputs(1, 12, 32, E, k, 32, dtype)
        calls.clear()
        leaves = [t.clone().requires_grad_() for t in (x, scores, w_qkv, w_o)]
        sparse_attention_triton(leaves[0], leaves[1], idx, leaves[2], leaves[3], 16, deterministic=det).sum().backward()
        return len(calls)

    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert run(None, 4) == 0 and run(True, 4) == 1  # 8 kept rows of 12 tokens: atomics by default
        # 2 kept rows of 12 into float32 results, which take the atomics in place: atomics by default
        assert run(None, 2, E=1) == 0 and run(True, 2, E=1) == 1
        # float16 results summed in a float32 buffer (NARROW_ATOMICS off): rows where few rows are kept
        monkeypatch.setattr(triton_mosa, "NARROW_ATOMICS", False)
        assert run(None, 2, E=1, dtype=torch.float16) == 1 and run(False, 2, E=1, dtype=torch.float16) == 0
        assert run(None, 4, dtype=torch.float16) == 0
        monkeypatch.setattr(triton_mosa, "NARROW_ATOMICS", True)
        assert run(None, 2, E=1, dtype=torch.float16) == 0  # in place again
        torch.use_deterministic_algorithms(True)
        assert run(None, 4) == 1 and run(False, 4) == 0
    finally:
        torch.use_deterministic_algorithms(was)
    x, scores, idx, w_qkv, w_o = _inputs(1, 12, 32, 2, 4, 32, torch.float32)
    with pytest.raises(ValueError, match="deterministic='yes'"):
        sparse_attention_triton(x, scores, idx, w_qkv, w_o, 16, deterministic="yes")


def test_bad_input_is_rejected():
    x, scores, idx, w_qkv, w_o = _inputs(1, 8, 32, 2, 4, 32, torch.float32)
    with pytest.raises(ValueError, match="w_qkv.dtype"):
        sparse_attention_triton(x, scores, idx, w_qkv.half(), w_o, 16)
    with pytest.raises(ValueError, match="rope_dims"):
        sparse_attention_triton(x, scores, idx, w_qkv, w_o, 7)
    with pytest.raises(ValueError, match="D=160"):
        big = torch.randn(2, 32, 480)
        sparse_attention_triton(x, scores, idx, big, torch.randn(2, 160, 32), 16)
    with pytest.raises(ValueError, match="x.shape"):
        sparse_attention_triton(x[0], scores, idx, w_qkv, w_o, 16)


@pytest.mark.parametrize("bad", [-1, 13, 40], ids=["negative", "T+1", "far"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_positions_outside_the_sequence_are_rejected(bad, backend):
    # (the reference used to add a position in (T, 2T] into the next sequence's rows, and the kernels read
    # row -1 of x; on a GPU, where checking would wait for the device, they are taken as padding)
    from mosa_attention.ops import sparse_attention
    x, scores, idx, w_qkv, w_o = _inputs(2, 12, 32, 2, 4, 32, torch.float32)
    idx = idx.clone()
    idx[0, 1, 2] = bad
    if x.is_cuda:  # taken as padding, as position T is
        padded = idx.clone()
        padded[0, 1, 2] = 12
        want = sparse_attention(x, scores, padded, w_qkv, w_o, rope_dims=16, backend=backend)
        got = sparse_attention(x, scores, idx, w_qkv, w_o, rope_dims=16, backend=backend)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        return
    with pytest.raises(ValueError, match=f"positions in \\[0, T=12\\].*{bad}"):
        sparse_attention(x, scores, idx, w_qkv, w_o, rope_dims=16, backend=backend)
    if backend == "triton":
        with pytest.raises(ValueError, match="positions in"):
            sparse_attention_triton(x, scores, idx, w_qkv, w_o, 16)


def test_reference_needs_one_dtype_outside_autocast():
    from mosa_attention.ops import sparse_attention
    x, scores, idx, w_qkv, w_o = _inputs(1, 8, 32, 2, 4, 32, torch.float32)
    with pytest.raises(ValueError, match="w_qkv.dtype=torch.float64"):
        sparse_attention(x, scores, idx, w_qkv.double(), w_o, rope_dims=16, backend="torch")
    with pytest.raises(ValueError, match="x.dtype=torch.float64"):  # the kernels' float64 fallback
        sparse_attention_triton(x.double(), scores, idx, w_qkv, w_o, 16)


def test_non_contiguous_input_is_copied():
    x, scores, idx, w_qkv, w_o = _inputs(2, 12, 32, 2, 6, 32, torch.float32)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    y = sparse_attention_triton(xt, scores, idx, w_qkv, w_o, 16)
    y_ref = sparse_attention_reference(x.double(), scores.double(), idx, w_qkv.double(), w_o.double(), 16)
    assert _rel(y, y_ref) < 1e-5


def test_float64_falls_back_to_reference():
    x, scores, idx, w_qkv, w_o = _inputs(1, 8, 32, 2, 4, 32, torch.float64)
    y = sparse_attention_triton(x, scores, idx, w_qkv, w_o, 16)
    torch.testing.assert_close(y, sparse_attention_reference(x, scores, idx, w_qkv, w_o, 16))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_compiles_without_graph_break(deterministic):
    x, scores, idx, w_qkv, w_o = _inputs(2, 12, 32, 2, 6, 32, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, scores, w_qkv, w_o)]
    fn = torch.compile(lambda a, s, wq, wo: sparse_attention_triton(a, s, idx, wq, wo, 16, deterministic=deterministic),
                       fullgraph=True, backend="aot_eager")
    y = fn(*leaves)
    y.sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (x, scores, w_qkv, w_o)]
    y_ref = sparse_attention_reference(ref[0], ref[1], idx, ref[2], ref[3], 16)
    y_ref.sum().backward()
    assert _rel(y, y_ref) < 1e-5
    assert all(_rel(a.grad, b.grad) < 1e-5 for a, b in zip(leaves, ref))


def test_autocast_reads_wide_x_tile_by_tile():
    # float32 x and weights under float16 autocast: weights are cast, x is read as is; x's grad stays float32
    x, scores, idx, w_qkv, w_o = _inputs(2, 24, 32, 2, 9, 32, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, scores, w_qkv, w_o)]
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = sparse_attention_triton(leaves[0], leaves[1], idx, leaves[2], leaves[3], 16)
    assert y.dtype == torch.float16
    dy = torch.randn_like(y)
    y.backward(dy)
    assert leaves[0].grad.dtype == torch.float32
    ref = [t.detach().half().double().requires_grad_() for t in (x, scores, w_qkv, w_o)]
    y_ref = sparse_attention_reference(ref[0], ref[1], idx, ref[2], ref[3], 16)
    y_ref.backward(dy.double())
    errs = [_rel(y, y_ref)] + [_rel(a.grad, b.grad) for a, b in zip(leaves, ref)]
    assert all(e < 3e-3 for e in errs), errs
    # float32 weights go into the op as they are (no 16-bit copies) and their gradients come out in float32
    # (no cast in the autograd graph)
    assert all(g.dtype == torch.float32 for g in (leaves[2].grad, leaves[3].grad))
    inputs = [type(f).__name__ for f, _ in y.grad_fn.next_functions if f is not None]
    assert not any("ToCopy" in n for n in inputs), inputs


def test_router_fused_under_autocast_keeps_float32_weights():
    from mosa_attention.ops.triton_mosa import mosa_triton
    B, T, h, E, k, D = 2, 24, 32, 3, 7, 32
    x = torch.randn(B, T, h, device=DEVICE)
    ws = [torch.randn(E, h, device=DEVICE) / 6, torch.randn(E, h, 3 * D, device=DEVICE) / 6,
          torch.randn(E, D, h, device=DEVICE) / 6]
    leaves = [t.clone().requires_grad_() for t in [x] + ws]
    with torch.autocast(DEVICE, dtype=torch.float16):
        y, kept, idx = mosa_triton(*leaves, k, True, 16)
    assert y.dtype == torch.float16
    dy = torch.randn_like(y)
    y.backward(dy)
    assert all(t.grad.dtype == torch.float32 for t in leaves)
    assert not any("ToCopy" in type(f).__name__ for f, _ in y.grad_fn.next_functions if f is not None)
    # reference: the fp16-rounded inputs in float64, at the op's selection
    ref = [t.detach().half().double().requires_grad_() for t in [x] + ws]
    r = torch.sigmoid(torch.nn.functional.linear(ref[0], ref[1])).transpose(1, 2).gather(-1, idx)
    y_ref = sparse_attention_reference(ref[0], r, idx, ref[2], ref[3], 16)
    y_ref.backward(dy.double())
    errs = [_rel(y, y_ref), _rel(kept, r)] + [_rel(a.grad, b.grad) for a, b in zip(leaves, ref)]
    assert all(e < 3e-3 for e in errs), errs


def test_launch_retries_with_fewer_stages_when_shared_memory_runs_out(monkeypatch):
    from triton.runtime.errors import OutOfResources
    tried = []

    class FakeKernel:  # a kernel whose pipeline fits in shared memory only at 2 stages or fewer
        __name__ = "fake_kernel"

        def __getitem__(self, grid):
            def launch(*args, num_stages=3, **kw):
                tried.append(num_stages)
                if num_stages > 2:
                    raise OutOfResources(100000 * num_stages, 232448, "shared memory")
            return launch

    monkeypatch.setattr(triton_mosa, "_STAGES_THAT_FIT", {})
    for _ in range(2):
        triton_mosa._launch(FakeKernel(), lambda t: (1,), (torch.zeros(1),), dict(BM=64), num_warps=4, num_stages=4)
    assert tried == [4, 3, 2, 2]  # the second launch starts at the depth that fitted


def test_int32_positions():
    x, scores, idx, w_qkv, w_o = _inputs(2, 30, 32, 2, 10, 32, torch.float32, pad=2)
    y = sparse_attention_triton(x, scores, idx.int(), w_qkv, w_o, 16)
    y_ref = sparse_attention_reference(x.double(), scores.double(), idx, w_qkv.double(), w_o.double(), 16)
    assert _rel(y, y_ref) < 1e-5


# ---------------------------------------------------------------------------------- routing fused in
def _routed_compare(B, T, h, E, k, D, rope_dims, include_first, dtype, tol, deterministic=None, beside=False):
    from mosa_attention.ops.routing import select_topk
    from mosa_attention.ops.triton_mosa import mosa_triton
    x = torch.randn(B, T, h, dtype=dtype)
    w = [torch.randn(E, h, dtype=dtype) / h ** 0.5, torch.randn(E, h, 3 * D, dtype=dtype) / h ** 0.5,
         torch.randn(E, D, h, dtype=dtype) / D ** 0.5]
    leaves = [t.to(DEVICE).requires_grad_() for t in [x] + w]
    y, kept, idx = mosa_triton(*leaves, k, include_first, rope_dims, deterministic=deterministic, beside=beside)
    assert not kept.requires_grad and not idx.requires_grad
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    scores = torch.sigmoid(torch.nn.functional.linear(ref[0], ref[1])).transpose(1, 2)
    ref_kept, ref_idx = select_topk(scores, k, include_first, backend="torch")
    if dtype == torch.bfloat16:  # bfloat16 logits tie where float64 ones do not: the reference takes the
        ref_idx = idx            # kernel's selection (top-k's own bfloat16 tests: test_triton_routing.py)
        ref_kept = scores.gather(2, idx)
    y_ref = sparse_attention_reference(ref[0], ref_kept, ref_idx, ref[2], ref[3], rope_dims)
    y_ref.backward(dy.double())
    assert torch.equal(idx, ref_idx)
    errs = {"y": _rel(y, y_ref), "kept": _rel(kept, ref_kept)}
    errs.update({n: _rel(a.grad, b.grad) for n, a, b in zip(("x", "w_router", "w_qkv", "w_o"), leaves, ref)})
    assert all(e < tol for e in errs.values()), errs


@pytest.mark.parametrize("B,T,h,E,k,D,rope_dims,include_first", [
    (2, 40, 48, 3, 9, 32, 16, False),    # T, k off the block sizes
    (1, 20, 32, 2, 2, 32, 16, True),     # k = 2, batch 1, include_first
    (2, 24, 32, 2, 24, 64, 64, False),   # k = T
    (1, 150, 32, 2, 100, 32, 16, True),  # several blocks per sequence
])
@pytest.mark.parametrize("dtype,deterministic", [(dt, det) for dt in DTYPES for det in (False, True)])
def test_router_fused_matches_reference(B, T, h, E, k, D, rope_dims, include_first, dtype, deterministic):
    # the router's gradients come out of the attention kernels: compare them with autograd through
    # sigmoid, top-k's gather and the router product; the router's share of dx goes through either scatter
    _routed_compare(B, T, h, E, k, D, rope_dims, include_first, dtype, TOL[dtype], deterministic)


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_weight_gradient_in_its_own_kernel(monkeypatch, dtype):
    # DWR_IN_DWQKV off: w_router's gradient from ``_dwr`` instead of ``_dwqkv`` (kept for comparison)
    from mosa_attention.ops import triton_mosa
    monkeypatch.setattr(triton_mosa, "DWR_IN_DWQKV", False)
    _routed_compare(2, 40, 48, 3, 9, 32, 16, False, dtype, TOL[dtype], False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first", [False, True])
def test_router_weight_gradient_as_one_dense_product(monkeypatch, dtype, first):
    # DENSE_ROUTER_GRAD_MIN_OVERLAP set (off by default): outside _dwqkv, heads that keep at least that many
    # rows per token (here 6 * 16 / 40 = 2.4; t3: 7.9) get w_router's gradient from one GEMM over the dense
    # d-logit matrix _out_bwd writes, not from _dwr
    from mosa_attention.ops import triton_mosa
    monkeypatch.setattr(triton_mosa, "DWR_IN_DWQKV", False)
    monkeypatch.setattr(triton_mosa, "DENSE_ROUTER_GRAD_MIN_OVERLAP", 2.0)
    launch, seen = triton_mosa._launch, []
    monkeypatch.setattr(triton_mosa, "_launch", lambda kernel, *a, **kw: (seen.append(kernel.fn.__name__),
                                                                           launch(kernel, *a, **kw))[1])
    for deterministic in (False, True):
        _routed_compare(2, 40, 48, 6, 16, 32, 16, first, dtype, TOL[dtype], deterministic)
    assert "_dwr" not in seen and "_out_bwd" in seen
    monkeypatch.setattr(triton_mosa, "DENSE_ROUTER_GRAD_MIN_OVERLAP", None)  # off: _dwr at any overlap
    _routed_compare(2, 40, 48, 6, 16, 32, 16, first, dtype, TOL[dtype], False)
    assert "_dwr" in seen


@pytest.mark.parametrize("deterministic", [None, True])
def test_layer_uses_the_fused_router_and_matches_torch_backend(deterministic):
    from mosa_attention.layers import MoSAAttention
    torch.manual_seed(1)
    fast = MoSAAttention(48, 3, 4, head_dim=32, num_dense_heads=1, include_first=True, backend="triton",
                         deterministic=deterministic).to(DEVICE)
    ref = MoSAAttention(48, 3, 4, head_dim=32, num_dense_heads=1, include_first=True, backend="torch").to(DEVICE)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 37, 48, device=DEVICE)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    (y, sel), (y_ref, sel_ref) = fast(xs[0], return_selection=True), ref(xs[1], return_selection=True)
    assert fast._fused(xs[0]) and torch.equal(sel[1], sel_ref[1])
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dense", "local"])
def test_hybrid_sums_at_the_kept_rows_only(monkeypatch, dtype, kind):
    # MASKED_SUMS: a hybrid on the fused op adds its MoSA part (y, and x's gradient) at the kept tokens only;
    # everything equals the full sums (the fused op's share is zero at every other token)
    import mosa_attention.layers.mosa as layer_module
    from mosa_attention.layers import MoSAAttention
    torch.manual_seed(5)
    # the atomic scatter's buffers come full of NaN: rows-only outputs (``ROWS_ONLY``, on with masked sums)
    # leave the rows of tokens no head kept as they are, so a sum that read one, or a kept row left
    # uncleared, would show up as NaN
    monkeypatch.setattr(triton_mosa, "_atomic_buffer",
                        lambda shape, dt, dev: torch.full(shape, float("nan"), dtype=dt, device=dev))
    layer = MoSAAttention(48, 3, 4, head_dim=32, num_dense_heads=1, dense_kind=kind, backend="triton").to(DEVICE)
    layer = layer.to(dtype)
    x = torch.randn(2, 37, 48, device=DEVICE, dtype=dtype)
    g = torch.randn_like(x)
    results = []
    for masked in (True, False):
        monkeypatch.setattr(layer_module, "MASKED_SUMS", masked)
        xs = x.clone().requires_grad_()
        y = layer(xs)
        results.append((y.detach(), *torch.autograd.grad((y * g).sum(), [xs, *layer.parameters()])))
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=2e-3),
           torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}[dtype]  # (about two roundings of each dtype)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)
    monkeypatch.setattr(layer_module, "MASKED_SUMS", True)
    assert layer._kept_rows(x) is not None
    # None (the default): masked where the heads are expected to keep at most half of the tokens, here
    # 1 - (1 - 9/37)^E of them: 24 % for one head, 57 % for three
    monkeypatch.setattr(layer_module, "MASKED_SUMS", None)
    assert layer._kept_rows(x) is None
    one_head = MoSAAttention(48, 1, 4, head_dim=32, num_dense_heads=1, dense_kind=kind, backend="triton")
    assert one_head._kept_rows(x) is not None
    assert MoSAAttention(48, 3, 4, head_dim=32, num_dense_heads=1, backend="torch")._kept_rows(x.cpu()) is None


def test_hybrid_masked_sums_under_autocast(monkeypatch):
    # under autocast over float32 (float16 here: the interpreter's bf16 products are unreliable) a masked
    # hybrid hands its MoSA heads the product's float16 copy of x (ops.attention.NARROW_SHARED_X) and adds
    # their float16 x-gradient at the kept rows; against the unmasked hybrid, which reads float32 x
    import mosa_attention.layers.mosa as layer_module
    from mosa_attention.layers import MoSAAttention
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    torch.manual_seed(8)
    layer = MoSAAttention(48, 2, 4, head_dim=32, num_dense_heads=1, backend="triton")
    x = torch.randn(2, 37, 48)
    g = torch.randn_like(x)
    seen = []
    fused = layer_module.mosa_topk_fused
    monkeypatch.setattr(layer_module, "mosa_topk_fused", lambda x, *a, **kw: (seen.append(x.dtype), fused(x, *a, **kw))[1])
    results = []
    for masked in (True, False):
        monkeypatch.setattr(layer_module, "MASKED_SUMS", masked)
        xs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            y = layer(xs)
        assert y.dtype == torch.float16
        results.append((y.float().detach(), *torch.autograd.grad((y.float() * g).sum(), [xs, *layer.parameters()])))
    assert results[0][1].dtype == torch.float32 and seen == [torch.float16, torch.float32]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_router_fused_reads_a_narrow_copy_of_x(monkeypatch):
    # x_read: under autocast over float32 x the kernels read x's copy in the compute dtype instead of x;
    # they cast x's tiles to that dtype anyway, so y and every gradient are the same bits, and x's
    # gradient stays float32 (without the op's own copy, NARROW_X, which would read one either way)
    from mosa_attention.ops.triton_mosa import mosa_triton
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    monkeypatch.setattr(triton_mosa, "NARROW_X", False)
    torch.manual_seed(9)
    x = torch.randn(2, 30, 32)
    w = [torch.randn(3, 32), torch.randn(3, 32, 96) / 6, torch.randn(3, 32, 32) / 6]
    dy = torch.randn(2, 30, 32)
    out = []
    for narrow in (False, True):
        xs, ws = x.clone().requires_grad_(), [t.clone().requires_grad_() for t in w]
        with torch.autocast("cpu", dtype=torch.float16):
            y, kept, idx = mosa_triton(xs, *ws, 8, False, 16, x_read=xs.detach().half() if narrow else None)
        y.float().backward(dy)
        out.append((idx, y.detach(), xs.grad, *(t.grad for t in ws)))
    assert out[1][2].dtype == torch.float32
    for a, b in zip(*out):
        assert torch.equal(a, b)
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(ValueError, match="x_read must be"):
        mosa_triton(x, *w, 8, False, 16, x_read=x.bfloat16())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("routed", [False, True], ids=["sparse_attention", "routed"])
def test_narrow_copies_under_autocast_change_no_bit(monkeypatch, routed, compiled):
    # under autocast over float32 x and weights the op reads, and saves for its backward, copies in the compute
    # dtype: x's where the router product makes it (NARROW_X), the weights' (NARROW_WEIGHTS, forced here: the
    # rule wants longer heads); under torch.compile the compiled graph makes them and the custom ops take them.
    # The kernels cast the tiles they load to the same values, so y and every gradient are the same bits as the
    # eager op's without the copies, the gradients in float32
    from mosa_attention.ops.triton_mosa import mosa_triton
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    torch.manual_seed(4)
    x, scores, idx, w_qkv, w_o = _inputs(2, 40, 32, 3, 9, 32, torch.float32)
    w_router = torch.randn(3, 32)
    dy = torch.randn(2, 40, 32)

    def op(*leaves):
        with torch.autocast("cpu", dtype=torch.float16):
            if routed:
                return mosa_triton(*leaves, 9, False, 16)[0]
            return sparse_attention_triton(leaves[0], leaves[1], idx, leaves[2], leaves[3], 16)
    out, saved, read = [], [], []
    fwd = triton_mosa._fwd_impl
    monkeypatch.setattr(triton_mosa, "_fwd_impl",
                        lambda *a, **kw: (read.append((a[0].dtype, a[3].dtype)), fwd(*a, **kw))[1])
    for narrow in (False, True):
        monkeypatch.setattr(triton_mosa, "NARROW_X", narrow)
        monkeypatch.setattr(triton_mosa, "NARROW_WEIGHTS", narrow)
        torch._dynamo.reset()
        leaves = [t.clone().requires_grad_() for t in ((x, w_router) if routed else (x, scores)) + (w_qkv, w_o)]
        y = (torch.compile(op, fullgraph=True, backend="aot_eager") if compiled and narrow else op)(*leaves)
        if not compiled:
            saved.append([t.dtype for t in y.grad_fn.saved_tensors])
        y.float().backward(dy)
        out.append([y.detach()] + [t.grad for t in leaves])
        assert all(t.grad.dtype == torch.float32 for t in leaves)
    for a, b in zip(*out):
        assert torch.equal(a, b)
    # what the kernels read (x, w_qkv): the float32 tensors, then the copies; without gradients no copies
    assert read[0] == (torch.float32, torch.float32)
    assert read[-1] == (torch.float16 if routed else torch.float32, torch.float16)
    if not compiled:
        with torch.no_grad():
            torch.testing.assert_close(op(*leaves), out[0][0], rtol=0, atol=0)
        assert read[-1] == (torch.float32, torch.float32)
    if not compiled:  # what the backward keeps: x (its copy where routed), scores, idx, w_qkv, w_o, ...
        assert saved[0][3:5] == [torch.float32] * 2 and saved[1][3:5] == [torch.float16] * 2
        assert saved[0][0] == torch.float32 and saved[1][0] == (torch.float16 if routed else torch.float32)


def test_eager_routed_op_makes_its_copies_in_one_launch(monkeypatch):
    # under autocast over float32 the eager routed op casts x, w_qkv, w_o and the router weight (for its product) in
    # one cast_many launch (CAST_TOGETHER): the same bits as one cast each, the gradients float32
    from mosa_attention.ops import combine
    from mosa_attention.ops.triton_mosa import mosa_triton
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    monkeypatch.setattr(triton_mosa, "NARROW_WEIGHTS", True)
    torch.manual_seed(6)
    x, _, _, w_qkv, w_o = _inputs(2, 40, 32, 3, 9, 32, torch.float32)
    w_router, dy = torch.randn(3, 32), torch.randn(2, 40, 32)
    calls = []
    real = combine.cast_many
    monkeypatch.setattr(combine, "cast_many", lambda ts, dt: calls.append([t.shape for t in ts]) or real(ts, dt))
    out = []
    for together in (True, False):
        monkeypatch.setattr(triton_mosa, "CAST_TOGETHER", together)
        leaves = [t.clone().requires_grad_() for t in (x, w_router, w_qkv, w_o)]
        with torch.autocast("cpu", dtype=torch.float16):
            y = mosa_triton(*leaves, 9, False, 16)[0]
        y.float().backward(dy)
        out.append([y.detach()] + [t.grad for t in leaves])
        assert all(t.grad.dtype == torch.float32 for t in leaves)
    assert calls == [[x.shape, w_qkv.shape, w_o.shape, w_router.shape]]
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_narrow_copies_keep_each_weights_gradient_dtype(monkeypatch, compiled):
    # under autocast the weights may differ in dtype (w_qkv float32, w_o bfloat16 here): with their copies each
    # weight's gradient still comes out of the op in its own dtype (no cast left to autograd) and with the values
    # it has without the copies
    from mosa_attention.ops.triton_mosa import mosa_triton
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    torch.manual_seed(5)
    x, _, _, w_qkv, w_o = _inputs(2, 40, 32, 3, 9, 32, torch.float32)
    w_o, w_router = w_o.bfloat16(), torch.randn(3, 32)
    dy = torch.randn(2, 40, 32)
    out, made = [], []
    bwd = triton_mosa._bwd_impl
    monkeypatch.setattr(triton_mosa, "_bwd_impl",
                        lambda *a, **kw: (lambda g: (made.append([t.dtype for t in g]), g)[1])(bwd(*a, **kw)))
    for narrow in (False, True):
        monkeypatch.setattr(triton_mosa, "NARROW_WEIGHTS", narrow)
        torch._dynamo.reset()
        leaves = [t.clone().requires_grad_() for t in (x, w_router, w_qkv, w_o)]

        def op(*ts):
            with torch.autocast("cpu", dtype=torch.float16):
                return mosa_triton(*ts, 9, False, 16)[0]
        y = (torch.compile(op, fullgraph=True, backend="aot_eager") if compiled and narrow else op)(*leaves)
        y.float().backward(dy)
        # the op's own gradients (x, w_router, w_qkv, w_o), before autograd could cast them
        assert made[-1] == [torch.float32] * 3 + [torch.bfloat16], made
        out.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_narrow_x_copy_is_kept_instead_of_the_norm_output(monkeypatch):
    # in a pre-norm block under autocast the layer's x is the norm's float32 output, which only the MoSA op saves
    # for its backward: with NARROW_X the op saves its compute-dtype copy instead, so the step keeps half those
    # bytes (the unique storages every node saves, parameters and the block's input left out)
    from torch import nn
    from mosa_attention.layers import MoSAAttention
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    torch.manual_seed(2)
    B, T, h = 2, 48, 32
    ln, attn = nn.LayerNorm(h), MoSAAttention(h, 3, 4, head_dim=32, backend="triton")
    params = {p.data_ptr() for p in list(ln.parameters()) + list(attn.parameters())}
    x = torch.randn(B, T, h, requires_grad=True)
    kept = []
    for narrow in (False, True):
        monkeypatch.setattr(triton_mosa, "NARROW_X", narrow)
        saved = {}

        def pack(t):
            if t.data_ptr() not in params and t.data_ptr() != x.data_ptr():
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.float16):
            y = x + attn(ln(x))
        y.float().sum().backward()
        kept.append(sum(saved.values()))
    assert kept[0] - kept[1] == B * T * h * 2, kept  # a float32 [B, T, h] became a float16 one


def test_narrow_weights_rule(monkeypatch):
    w_qkv, w_o = torch.randn(2, 8, 24), torch.randn(2, 8, 8)
    dts = lambda ws: [w.dtype for w in ws]  # noqa: E731
    rows = triton_mosa.NARROW_WEIGHTS_MIN_ROWS
    assert dts(triton_mosa._narrow_weights(w_qkv, w_o, torch.bfloat16, rows)) == [torch.bfloat16] * 2
    assert dts(triton_mosa._narrow_weights(w_qkv, w_o, torch.bfloat16, rows - 1)) == [torch.float32] * 2
    same = triton_mosa._narrow_weights(w_qkv, w_o, torch.float32, rows)
    assert same[0] is w_qkv and same[1] is w_o
    monkeypatch.setattr(triton_mosa, "NARROW_WEIGHTS", True)
    assert dts(triton_mosa._narrow_weights(w_qkv, w_o, torch.float16, 1)) == [torch.float16] * 2
    monkeypatch.setattr(triton_mosa, "NARROW_WEIGHTS", False)
    assert dts(triton_mosa._narrow_weights(w_qkv, w_o, torch.float16, 10 ** 6)) == [torch.float32] * 2


def test_hybrid_kernels_read_the_products_copy_under_autocast(monkeypatch):
    # X_READ: a hybrid without masked sums under autocast over float32 hands the fused op the dense
    # product's float16 copy of x to read; output and gradients as when the op reads x itself
    import mosa_attention.layers.mosa as layer_module
    from mosa_attention.layers import MoSAAttention
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    torch.manual_seed(10)
    monkeypatch.setattr(layer_module, "MASKED_SUMS", False)
    layer = MoSAAttention(48, 2, 4, head_dim=32, num_dense_heads=1, backend="triton")
    x, g = torch.randn(2, 37, 48), torch.randn(2, 37, 48)
    results = []
    for read in (True, False):
        monkeypatch.setattr(layer_module, "X_READ", read)
        xs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            assert (layer._sharing(xs, None)[1] is not None) is read
            y = layer(xs)
        results.append((y.detach(), *torch.autograd.grad((y.float() * g).sum(), [xs, *layer.parameters()])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # a non-contiguous x: its copy is made contiguous for the kernels
    monkeypatch.setattr(layer_module, "X_READ", True)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    with torch.autocast("cpu", dtype=torch.float16):
        torch.testing.assert_close(layer(xt), results[0][0], rtol=1e-6, atol=1e-6)


def test_layer_rejects_bad_deterministic():
    from mosa_attention.layers import FixedSparseAttention, MoSAAttention
    with pytest.raises(ValueError, match="deterministic='on'"):
        MoSAAttention(32, 2, 4, deterministic="on")
    with pytest.raises(ValueError, match="deterministic=1"):
        FixedSparseAttention(32, 2, 4, deterministic=1)


def test_router_fused_marks_the_kept_rows():
    # mark_rows: the [B, T] mask of tokens some head kept (a hybrid's masked sums read it), set by the op
    from mosa_attention.ops.triton_mosa import mosa_triton
    torch.manual_seed(3)
    x = torch.randn(2, 21, 32, device=DEVICE)
    wr, wq, wo = torch.randn(3, 32, device=DEVICE), torch.randn(3, 32, 96, device=DEVICE), torch.randn(3, 32, 32, device=DEVICE)
    rows = torch.zeros(2, 21, dtype=torch.bool, device=DEVICE)
    y, kept, idx = mosa_triton(x, wr, wq, wo, 4, False, 16, mark_rows=rows)
    want = torch.zeros_like(rows)
    want.scatter_(1, idx.reshape(2, -1), True)
    assert torch.equal(rows, want) and 4 <= int(rows[0].sum()) <= 12
    with pytest.raises(ValueError, match="mark_rows"):
        mosa_triton(x, wr, wq, wo, 4, False, 16, mark_rows=torch.zeros(2, 20, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="mark_rows"):
        mosa_triton(x, wr, wq, wo, 4, False, 16, mark_rows=rows.float())
    with pytest.raises(ValueError, match="not contiguous"):
        mosa_triton(x, wr, wq, wo, 4, False, 16, mark_rows=torch.zeros(21, 2, dtype=torch.bool, device=DEVICE).t())
    with pytest.raises(ValueError, match="rows_only=True needs mark_rows"):
        mosa_triton(x, wr, wq, wo, 4, False, 16, rows_only=True)


@pytest.mark.parametrize("dtype,scaled", [(torch.float32, False), (torch.float16, False), (torch.float32, True)])
def test_router_fused_rows_only(monkeypatch, dtype, scaled):
    # rows_only: y and x's gradient are written at the marked (kept) rows only, the scatter buffers cleared
    # there only. Buffers handed over full of NaN: the marked rows must equal the full op's, the others
    # must be left untouched (still NaN: nothing cleared or wrote them). scaled: y through the scaled float16
    # buffer (forced), whose unmarked rows stay NaN through the division too
    from mosa_attention.ops.triton_mosa import mosa_triton
    monkeypatch.setattr(triton_mosa, "SCALED_HALF_ATOMICS", True if scaled else None)
    monkeypatch.setattr(triton_mosa, "_atomic_buffer",
                        lambda shape, dt, dev: torch.full(shape, float("nan"), dtype=dt, device=dev))
    torch.manual_seed(4)
    B, T, h, E = 2, 70, 32, 3
    x = torch.randn(B, T, h, device=DEVICE, dtype=dtype)
    w = [torch.randn(E, h, device=DEVICE, dtype=dtype), torch.randn(E, h, 96, device=DEVICE, dtype=dtype) / 6,
         torch.randn(E, 32, h, device=DEVICE, dtype=dtype) / 6]
    dy = torch.randn(B, T, h, device=DEVICE, dtype=dtype)
    out = []
    for rows_only in (False, True):
        xs, ws = x.clone().requires_grad_(), [t.clone().requires_grad_() for t in w]
        rows = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
        # 3 heads keep 12 of 70: 0.51 kept rows per token (atomics: above ATOMIC_MIN_ROWS), ~43 % of tokens
        y, kept, idx = mosa_triton(xs, *ws, 12, False, 16, mark_rows=rows, rows_only=rows_only)
        y.backward(dy)
        out.append((rows, y.detach(), xs.grad, *(t.grad for t in ws)))
    (rows, y, dx, *dw), (rows1, y1, dx1, *dw1) = out
    assert torch.equal(rows, rows1) and 0 < int(rows.sum()) < B * T
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y1[rows], y[rows], **tol)
    torch.testing.assert_close(dx1[rows], dx[rows], **tol)
    assert torch.isfinite(y[~rows]).all() and torch.isnan(y1[~rows]).all() and torch.isnan(dx1[~rows]).all()
    for a, b in zip(dw1, dw):
        torch.testing.assert_close(a, b, **tol)


def test_router_fused_bad_input():
    from mosa_attention.ops.triton_mosa import mosa_triton
    x = torch.randn(1, 10, 32, device=DEVICE)
    wr, wq, wo = torch.randn(2, 32, device=DEVICE), torch.randn(2, 32, 96, device=DEVICE), torch.randn(2, 32, 32, device=DEVICE)
    with pytest.raises(ValueError, match="w_router"):
        mosa_triton(x, wr[:, :5], wq, wo, 3, False, 16)
    with pytest.raises(ValueError, match="k=11"):
        mosa_triton(x, wr, wq, wo, 11, False, 16)
    with pytest.raises(ValueError, match="rope_dims"):
        mosa_triton(x, wr, wq, wo, 3, False, 7)


def test_router_fused_compiles_without_graph_break():
    from mosa_attention.ops.triton_mosa import mosa_triton
    x = torch.randn(2, 30, 32, device=DEVICE)
    ws = [torch.randn(3, 32, device=DEVICE) / 6, torch.randn(3, 32, 96, device=DEVICE) / 6,
          torch.randn(3, 32, 32, device=DEVICE) / 6]
    runs = []
    for compiled in (False, True):
        leaves = [t.clone().requires_grad_() for t in [x] + ws]
        fn = lambda *a: mosa_triton(*a, 7, True, 16)  # noqa: E731
        if compiled:
            fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
        y, kept, idx = fn(*leaves)
        y.backward(torch.ones_like(y))
        runs.append([y.detach(), kept, idx] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hybrid_layer_compiles_in_one_graph_on_the_triton_path():
    from mosa_attention.layers import MoSAAttention
    torch.manual_seed(0)
    layer = MoSAAttention(32, 3, 4, head_dim=32, num_dense_heads=1, backend="triton").to(DEVICE)
    x = torch.randn(2, 20, 32, device=DEVICE, requires_grad=True)
    y0 = layer(x)
    y0.sum().backward()
    g0, x.grad = x.grad.clone(), None
    y1 = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    y1.sum().backward()
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, g0, rtol=1e-5, atol=1e-6)


def test_router_fused_long_rows_use_torch_topk(monkeypatch):
    # rows longer than the top-k kernel's limit are selected by torch.topk inside the fused op (T = 65536 on
    # a GPU); a small limit sends these short rows the same way
    from mosa_attention.ops import triton_routing
    monkeypatch.setattr(triton_routing, "MAX_T", 8)
    _routed_compare(2, 40, 48, 3, 9, 32, 16, True, torch.float32, TOL[torch.float32])


def test_vector_atomics_only_where_they_are_valid(monkeypatch):
    # the four-wide red.global.add needs sm_90, whole 16-byte groups (h % 4 == 0) and real PTX (no interpreter)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(triton_mosa, "_interpreting", lambda: False)
    for cap, h, on, want in (((9, 0), 512, True, True), ((8, 0), 512, True, False), ((9, 0), 510, True, False),
                             ((9, 0), 512, False, False), ((10, 0), 64, True, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=cap: c)
        monkeypatch.setattr(triton_mosa, "_CAPABILITY", {})  # (read once per device)
        monkeypatch.setattr(triton_mosa, "VECTOR_ATOMICS", on)
        assert triton_mosa._vector_atomics(cuda, h) is want, (cap, h, on)
    assert triton_mosa._vector_atomics(torch.device("cpu"), 512) is False
    monkeypatch.setattr(triton_mosa, "_interpreting", lambda: True)
    assert triton_mosa._vector_atomics(cuda, 512) is False


def test_default_scatter_takes_the_atomics_where_they_add_in_place(monkeypatch):
    # use_rows(None, ...) at t4's shape (60 heads keep 64 of 65536 tokens: 0.06 kept rows per token, h 1024):
    # on sm_90 bf16 results (and, under autocast, float32 x's gradient) take the atomics in place, so atomics;
    # on sm_80 bf16 would go through a float32 buffer, so the rows + segment sum; t3 (7.9 rows per token)
    # takes atomics either way
    cuda = torch.device("cuda", 0)
    bf16, f32 = torch.bfloat16, torch.float32
    monkeypatch.setattr(triton_mosa, "_interpreting", lambda: False)
    kept, out = 60 * 64, 65536
    for cap, dtypes, overlap, rows in (((9, 0), (bf16, bf16), kept / out, False), ((9, 0), (bf16, f32), kept / out, False),
                                       ((8, 0), (bf16, bf16), kept / out, True), ((9, 0), (f32, f32), kept / out, False),
                                       ((8, 0), (bf16, bf16), 7.9, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=cap: c)
        monkeypatch.setattr(triton_mosa, "_CAPABILITY", {})  # (read once per device)
        in_place = triton_mosa._atomics_in_place(cuda, 1024, dtypes, overlap)
        got = triton_mosa.use_rows(None, round(overlap * out), out, in_place)
        assert got is rows, (cap, dtypes, overlap)
        assert triton_mosa.use_rows(True, 1, out, in_place) and not triton_mosa.use_rows(False, 1, out, in_place)


def test_atomic_scatter_dtype_plan(monkeypatch):
    # 16-bit results take the atomic additions themselves where the GPU adds them natively (bfloat16 from
    # sm_90, eight columns per instruction where h allows), else a float32 buffer; float32 stays float32.
    # A bfloat16 y with many rows per token: the scaled float16 buffer where float16 vectors add (sm_90);
    # x's gradient (scaled_ok=False) a float32 one
    cuda = torch.device("cuda", 0)
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    monkeypatch.setattr(triton_mosa, "_interpreting", lambda: False)
    # (bfloat16 only where about one kept row lands on a token: each addition rounds)
    cases = (((9, 0), 512, bf16, True, 0.5, (bf16, 8)), ((9, 0), 36, bf16, True, 1.0, (bf16, 4)),
             ((9, 0), 512, bf16, True, 7.9, (f16, 8)), ((9, 0), 510, bf16, True, 0.5, (f32, 0)),
             ((9, 0), 36, bf16, True, 7.9, (f16, 4)), ((8, 0), 512, bf16, True, 7.9, (f32, 0)),
             ((8, 0), 512, bf16, True, 0.5, (f32, 0)), ((8, 0), 512, f16, True, 7.9, (f16, 0)),
             ((9, 0), 512, f16, True, 7.9, (f16, 8)), ((9, 0), 512, f32, True, 0.5, (f32, 4)),
             ((9, 0), 512, bf16, False, 0.5, (f32, 4)), ((8, 0), 512, f16, False, 0.5, (f32, 0)))
    for cap, h, dt, narrow, overlap, want in cases:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=cap: c)
        monkeypatch.setattr(triton_mosa, "_CAPABILITY", {})  # (read once per device)
        monkeypatch.setattr(triton_mosa, "NARROW_ATOMICS", narrow)
        assert triton_mosa._atomic_plan(cuda, h, dt, overlap) == want, (cap, h, dt, narrow, overlap)
    monkeypatch.setattr(triton_mosa, "_interpreting", lambda: True)
    monkeypatch.setattr(triton_mosa, "NARROW_ATOMICS", True)
    assert triton_mosa._atomic_plan(cuda, 512, f16, 7.9) == (f16, 0)
    assert triton_mosa._atomic_plan(cuda, 512, bf16, 0.5) == (f32, 0)
    assert triton_mosa._atomic_plan(cuda, 512, bf16, 7.9) == (f32, 0)  # (scalar float16 atomics: not worth it)
    monkeypatch.setattr(triton_mosa, "_interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (9, 0))
    monkeypatch.setattr(triton_mosa, "_CAPABILITY", {})
    assert triton_mosa._atomic_plan(cuda, 512, bf16, 7.9, scaled_ok=False) == (f32, 4)
    monkeypatch.setattr(triton_mosa, "SCALED_HALF_ATOMICS", False)  # off: float32 as before
    assert triton_mosa._atomic_plan(cuda, 512, bf16, 7.9) == (f32, 4)
    monkeypatch.setattr(triton_mosa, "SCALED_HALF_ATOMICS", True)  # forced: every result but float16's
    for dt in (bf16, f32):
        assert triton_mosa._atomic_plan(cuda, 512, dt, 7.9) == (f16, 8)
        assert triton_mosa._atomic_plan(cuda, 512, dt, 7.9, scaled_ok=False) == (f32, 4)
    assert triton_mosa._atomic_plan(cuda, 512, f16, 7.9) == (f16, 8)
    assert triton_mosa._atomic_plan(cuda, 512, bf16, 0.5) == (bf16, 8)  # (one row per token: in place)


@pytest.mark.parametrize("narrow", [True, False])
def test_float16_atomic_scatter_in_place_or_in_float32(monkeypatch, narrow):
    # float16 results summed by float16 atomics (the result's own buffer) or in a float32 buffer: both close
    # to the reference, output and every gradient, with many heads on each token (the additions that round)
    monkeypatch.setattr(triton_mosa, "NARROW_ATOMICS", narrow)
    plan, used = triton_mosa._atomic_plan, []
    monkeypatch.setattr(triton_mosa, "_atomic_plan", lambda *a, **kw: used.append(plan(*a, **kw)) or used[-1])
    _compare(2, 24, 32, 12, 20, 32, 16, torch.float16, deterministic=False)
    # (the entry point asks first, for the choice of scatter: use_rows); vector atomics on sm_90, else scalar
    vec = triton_mosa._vector_atomics(torch.device(DEVICE), 32)
    assert used[-2:] == [(torch.float16, 8 if vec else 0) if narrow else (torch.float32, 4 if vec else 0)] * 2


def test_router_weight_gradient_placement_rule(monkeypatch):
    # None (default): inside _dwqkv where its grid fits in one wave of one program per SM, else _dwr
    from mosa_attention.ops import triton_mosa
    gpu = torch.device("cuda", 0)
    monkeypatch.setitem(triton_mosa._SM_COUNT, gpu, 132)
    assert triton_mosa._dwr_in_dwqkv(gpu, 68) and triton_mosa._dwr_in_dwqkv(gpu, 132)
    assert not triton_mosa._dwr_in_dwqkv(gpu, 133)
    assert triton_mosa._dwr_in_dwqkv(torch.device("cpu"), 10 ** 6)  # the interpreter: the fused path
    for forced in (True, False):
        monkeypatch.setattr(triton_mosa, "DWR_IN_DWQKV", forced)
        assert triton_mosa._dwr_in_dwqkv(gpu, 68) is forced and triton_mosa._dwr_in_dwqkv(gpu, 10 ** 6) is forced


@pytest.mark.parametrize("dtype", DTYPES)
def test_atomic_buffers_are_cleared_by_the_kernel_before_the_scatter(monkeypatch, dtype):
    # the [B, T, h] buffers of the atomic scatter come uncleared and _qkv_fwd / _out_bwd zero them: hand
    # them over full of NaN, so that any element those kernels miss shows up in y or dx (most tokens of this
    # shape are kept by no head, so their rows are only ever cleared)
    from mosa_attention.ops import triton_mosa
    monkeypatch.setattr(triton_mosa, "_atomic_buffer",
                        lambda shape, dt, dev: torch.full(shape, float("nan"), dtype=dt, device=dev))
    _routed_compare(2, 150, 40, 2, 9, 32, 16, False, dtype, TOL[dtype], False)
    _compare(2, 150, 40, 2, 9, 32, 16, dtype, deterministic=False)


def test_kept_and_idx_take_no_gradient_work():
    # the op's kept scores and positions carry no gradient and autograd hands them none (not even zeros):
    # a loss over y and the kept scores backpropagates through y alone
    from mosa_attention.ops.triton_mosa import mosa_triton
    x = torch.randn(1, 20, 32, device=DEVICE, requires_grad=True)
    w = [torch.randn(2, 32, device=DEVICE, requires_grad=True), torch.randn(2, 32, 96, device=DEVICE) / 6,
         torch.randn(2, 32, 32, device=DEVICE) / 6]
    y, kept, idx = mosa_triton(x, *w, 4, False, 16)
    (y.sum() + kept.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_long_row_reductions(deterministic):
    # 16-bit heads with R = B*k >= 512 rows reduce 128 rows per step in the weight-gradient kernels
    _routed_compare(4, 160, 32, 2, 130, 32, 16, False, torch.float16, TOL[torch.float16], deterministic)


# the attention backward's three forms: inside _out_bwd, its own kernel over blocks of whole sequences, and
# the dk/dv and dq kernels (what each form launches: the kernels in `seen` and not)
ATTN_BWD_FORMS = {"in-out-bwd": (True, True, "_out_bwd", "_attn_bwd_seqs"),
                  "one-kernel": (False, True, "_attn_bwd_seqs", "_attn_bwd_dq"),
                  "two-kernels": (False, False, "_attn_bwd_dq", "_attn_bwd_seqs")}


def _attn_bwd_form(monkeypatch, form):
    inside, seq_block = ATTN_BWD_FORMS[form][:2]
    monkeypatch.setattr(triton_mosa, "ATTN_IN_OUT_BWD", inside)
    monkeypatch.setattr(triton_mosa, "SEQ_BLOCK_BWD", seq_block)


def _record_launches(monkeypatch):
    launch, seen = triton_mosa._launch, []
    monkeypatch.setattr(triton_mosa, "_launch", lambda kernel, *a, **kw: (seen.append(kernel.fn.__name__),
                                                                           launch(kernel, *a, **kw))[1])
    return seen


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", list(ATTN_BWD_FORMS))
def test_attention_backward_for_short_sequences(monkeypatch, dtype, form):
    # k <= the row block: one program per block of whole sequences (here 64 // 9 = 7 sequences of 9 rows,
    # the block's last row idle; float32's 32-row block: 3), inside _out_bwd or in a kernel of its own, with
    # unsorted positions and padding slots, both scatters; or the dk/dv and dq kernels
    _attn_bwd_form(monkeypatch, form)
    seen = _record_launches(monkeypatch)
    for deterministic in (False, True):
        _compare(9, 40, 32, 2, 9, 32, 16, dtype, pad=2, unsorted=True, deterministic=deterministic)
    _compare(1, 20, 32, 2, 2, 32, 16, dtype)  # k = 2, batch 1
    _routed_compare(2, 40, 48, 3, 9, 32, 16, False, dtype, TOL[dtype], False)  # router gradients from _out_bwd
    ran, not_ran = ATTN_BWD_FORMS[form][2:]
    assert ran in seen and not_ran not in seen


@pytest.mark.parametrize("routed", [True, False], ids=["router-fused", "given-selection"])
@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside"])
def test_backward_kernels_follow_beside(monkeypatch, beside, routed):
    # by default the short sequences' attention backward runs inside _out_bwd, on 32-row blocks, where the op
    # has the GPU to itself, and in a kernel of its own after 64-row _out_bwd blocks where a hybrid's dense
    # heads run beside it (16-bit heads; float32's blocks are 32 rows either way); the same gradients
    launch, seen = triton_mosa._launch, []
    monkeypatch.setattr(triton_mosa, "_launch", lambda kernel, grid_fn, args, blocks, **kw: (
        seen.append((kernel.fn.__name__, blocks.get("BM"))), launch(kernel, grid_fn, args, blocks, **kw))[1])

    def run():
        if routed:
            _routed_compare(2, 40, 48, 3, 9, 32, 16, False, torch.float16, TOL[torch.float16], False, beside=beside)
        else:
            _compare(2, 40, 48, 3, 9, 32, 16, torch.float16, pad=2, unsorted=True, beside=beside)
    run()
    assert ("_out_bwd", 64 if beside else 32) in seen
    assert any(name == "_attn_bwd_seqs" for name, _ in seen) == beside
    monkeypatch.setattr(triton_mosa, "ATTN_IN_OUT_BWD", True)  # forced: inside also beside other kernels
    seen.clear()
    run()
    assert not any(name == "_attn_bwd_seqs" for name, _ in seen)


def test_beside_must_be_a_bool():
    from mosa_attention.ops.triton_mosa import mosa_triton
    x, scores, idx, w_qkv, w_o = _inputs(1, 16, 32, 2, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="beside=1"):
        sparse_attention_triton(x, scores, idx, w_qkv, w_o, 16, beside=1)
    with pytest.raises(ValueError, match="beside='yes'"):
        mosa_triton(x, torch.randn(2, 32, device=x.device), w_qkv, w_o, 4, False, 16, beside="yes")
    from mosa_attention.ops import sparse_attention
    for backend in ("torch", "triton"):  # the public op checks it for either backend
        with pytest.raises(ValueError, match="beside=None"):
            sparse_attention(x, scores, idx, w_qkv, w_o, rope_dims=16, backend=backend, beside=None)


@pytest.mark.parametrize("kernel", ["_attn_bwd_seqs", "_out_bwd"])
def test_short_sequence_backward_takes_a_tile_override(monkeypatch, kernel):
    # a tuning override of the block of the kernel that makes the short sequences' attention backward
    # (16 rows: one sequence of 9 per program instead of float32's three in 32) must set the rows each
    # program covers too, or rows go without gradients (or get two programs' dO)
    _attn_bwd_form(monkeypatch, "in-out-bwd" if kernel == "_out_bwd" else "one-kernel")
    monkeypatch.setitem(triton_mosa.TILE_OVERRIDES, kernel, {"BLK" if kernel == "_attn_bwd_seqs" else "BM": 16})
    seen = _record_launches(monkeypatch)
    _compare(9, 40, 32, 2, 9, 32, 16, torch.float32, pad=2, unsorted=True, deterministic=False)
    assert kernel in seen and (kernel == "_attn_bwd_seqs") == ("_attn_bwd_seqs" in seen)


@pytest.mark.parametrize("form", list(ATTN_BWD_FORMS))
def test_every_launch_names_only_the_kernels_parameters(monkeypatch, form):
    # Triton's interpreter ignores keyword arguments a kernel does not have, while a GPU launch raises on
    # them: check every launch of a forward + backward (both scatter modes, routing fused in) by hand
    import inspect
    _attn_bwd_form(monkeypatch, form)
    launch, seen = triton_mosa._launch, set()

    def checked(kernel, grid_fn, args, blocks, **meta):
        fn = kernel.fn if hasattr(kernel, "fn") else kernel
        names = set(inspect.signature(fn).parameters)
        unknown = (set(blocks) | set(meta)) - names - {"num_warps", "num_stages"}
        assert not unknown, (fn.__name__, unknown)
        assert len(args) + len(set(blocks) | (set(meta) & names)) <= len(names), fn.__name__
        seen.add(fn.__name__)
        return launch(kernel, grid_fn, args, blocks, **meta)
    monkeypatch.setattr(triton_mosa, "_launch", checked)
    for det in (False, True):
        _routed_compare(2, 40, 48, 3, 9, 32, 16, False, torch.float32, TOL[torch.float32], det)
    assert ATTN_BWD_FORMS[form][2] in seen and ATTN_BWD_FORMS[form][3] not in seen
    # the router's weight gradient outside _dwqkv: in _dwr, or (heads overlapping much) the dense d logit
    monkeypatch.setattr(triton_mosa, "DWR_IN_DWQKV", False)
    monkeypatch.setattr(triton_mosa, "DENSE_ROUTER_GRAD_MIN_OVERLAP", 2.0)
    _routed_compare(2, 40, 48, 3, 9, 32, 16, False, torch.float32, TOL[torch.float32], False)
    _routed_compare(2, 40, 48, 6, 16, 32, 16, False, torch.float32, TOL[torch.float32], False)
    assert "_dwr" in seen


@pytest.mark.parametrize("dtype", DTYPES)
def test_dwo_inside_out_bwd(monkeypatch, dtype):
    # DWO_IN_OUT_BWD forced on (by default only for grids of many heads on a GPU): one program per head holds
    # all of its R rows and makes w_o's gradient from the same dy tiles; _dwo is not launched
    monkeypatch.setattr(triton_mosa, "DWO_IN_OUT_BWD", True)
    launch, seen = triton_mosa._launch, []
    monkeypatch.setattr(triton_mosa, "_launch", lambda kernel, *a, **kw: (seen.append(kernel.fn.__name__),
                                                                           launch(kernel, *a, **kw))[1])
    for deterministic in (False, True):
        _compare(2, 40, 48, 3, 17, 32, 16, dtype, deterministic=deterministic)  # R = 34: a 64-row tile
        _compare(1, 20, 32, 2, 2, 32, 16, dtype, deterministic=deterministic)   # k = 2, batch 1: R = 2
        _compare(2, 30, 32, 2, 10, 32, 16, dtype, pad=2, unsorted=True, deterministic=deterministic)
    _routed_compare(2, 24, 32, 2, 24, 64, 64, False, dtype, TOL[dtype], False)  # k = T, router gradients
    assert "_dwo" not in seen and "_out_bwd" in seen
    monkeypatch.setattr(triton_mosa, "DWO_IN_OUT_BWD", None)  # default: never on the CPU
    seen.clear()
    _compare(2, 40, 48, 3, 17, 32, 16, dtype)
    assert "_dwo" in seen


def test_dwo_inside_out_bwd_choice(monkeypatch):
    c16 = triton_mosa._cfg(64, torch.bfloat16)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(triton_mosa, "_sm_count", lambda dev: 132)
    assert triton_mosa._dwo_in_out_bwd(cuda, 256, 505, c16)                # t3: 505 heads of 256 rows
    assert not triton_mosa._dwo_in_out_bwd(cuda, 512, 505, c16)            # too many rows for one program
    assert not triton_mosa._dwo_in_out_bwd(cuda, 256, 17, c16)             # t1/t2's 17 heads: a small grid
    assert not triton_mosa._dwo_in_out_bwd(cuda, 256, 505, triton_mosa._cfg(64, torch.float32))
    assert not triton_mosa._dwo_in_out_bwd(cuda, 256, 505, triton_mosa._cfg(128, torch.bfloat16))
    monkeypatch.setattr(triton_mosa, "DWO_IN_OUT_BWD", False)
    assert not triton_mosa._dwo_in_out_bwd(cuda, 256, 505, c16)


def test_dwo_inside_out_bwd_rejects_a_tile_that_cuts_a_head(monkeypatch):
    monkeypatch.setattr(triton_mosa, "DWO_IN_OUT_BWD", True)
    monkeypatch.setitem(triton_mosa.TILE_OVERRIDES, "_out_bwd", {"BM": 16})
    with pytest.raises(ValueError, match="R=34"):
        _compare(2, 40, 48, 3, 17, 32, 16, torch.float32)


def test_capability_is_read_once_per_device(monkeypatch):
    reads = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev: (reads.append(dev), (9, 0))[1])
    monkeypatch.setattr(triton_mosa, "_CAPABILITY", {})
    monkeypatch.setattr(triton_mosa, "_interpreting", lambda: False)
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert all(triton_mosa._vector_atomics(gpu0, 512) for _ in range(4))
    assert triton_mosa._vector_atomics(gpu1, 512) and not triton_mosa._vector_atomics(gpu1, 510)  # h % 4
    assert reads == [gpu0, gpu1]
    monkeypatch.setattr(triton_mosa, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev: (8, 0))  # before sm_90: scalar atomics
    assert not triton_mosa._vector_atomics(gpu0, 512)


# ----------------------------------------------------------------------- the scaled float16 scatter of y
def _count_unscaled(monkeypatch):
    """The calls of ``_unscaled`` from now on, each as (the result's dtype, a copy of the stats it read)."""
    calls, real = [], triton_mosa._unscaled

    def spy(buf, dtype, stats, D):
        calls.append((dtype, stats.clone()))
        return real(buf, dtype, stats, D)
    monkeypatch.setattr(triton_mosa, "_unscaled", spy)
    return calls


@pytest.mark.parametrize("B,T,h,E,k,D,rope_dims,pad,unsorted,repeat", [
    (2, 24, 32, 12, 20, 32, 16, 0, False, ()),     # 10 rows per token
    (2, 30, 36, 6, 10, 32, 16, 2, True, ()),       # padding, unsorted, h % 8 != 0
    (1, 40, 32, 4, 33, 64, 64, 0, False, (8, 9)),  # a position kept three times by a head, head dim 64
])
def test_scaled_half_scatter_matches_reference(monkeypatch, B, T, h, E, k, D, rope_dims, pad, unsorted, repeat):
    # forced for a float32 y (the interpreter's bf16 dots are wrong): y is summed in a float16 buffer times a
    # power of two set on the device from the maxima _qkv_fwd records, then divided back; only the float16
    # roundings of the additions separate it from the reference. x's gradient keeps its float32 buffer
    monkeypatch.setattr(triton_mosa, "SCALED_HALF_ATOMICS", True)
    calls = _count_unscaled(monkeypatch)
    _compare(B, T, h, E, k, D, rope_dims, torch.float32, pad, unsorted, repeat, deterministic=False, tol=2e-3)
    assert [dt for dt, _ in calls] == [torch.float32]  # y only


@pytest.mark.parametrize("w_o_scale", [1e7, 1e-7], ids=["huge", "tiny"])
def test_scaled_half_scatter_keeps_any_magnitude(monkeypatch, w_o_scale):
    # w_o times 1e7 makes y about 1e7, past float16's largest value (65504); times 1e-7, about 1e-7, under its
    # smallest normal (6e-5): unscaled float16 sums would be inf or keep few bits, the scale brings y into range
    monkeypatch.setattr(triton_mosa, "SCALED_HALF_ATOMICS", True)
    calls = _count_unscaled(monkeypatch)
    _compare(2, 24, 32, 12, 20, 32, 16, torch.float32, deterministic=False, tol=2e-3, w_o_scale=w_o_scale)
    assert len(calls) == 1


def test_scaled_half_scatter_with_the_router_fused(monkeypatch):
    # top-k keeps a token at most once per head: the bound takes n = E rows per token, uncounted
    monkeypatch.setattr(triton_mosa, "SCALED_HALF_ATOMICS", True)
    calls = _count_unscaled(monkeypatch)
    _routed_compare(2, 40, 48, 12, 20, 32, 16, True, torch.float32, 2e-3, False)
    assert len(calls) == 1


def test_scaled_half_scatter_bound_and_scale(monkeypatch):
    # the recorded maxima against the tensors they describe, and s a power of two that puts the bound of y's
    # sums in [2^12, 2^13)
    import math
    monkeypatch.setattr(triton_mosa, "SCALED_HALF_ATOMICS", True)
    B, T, h, E, k, D = 2, 24, 32, 12, 20, 32
    x, scores, idx, w_qkv, w_o = _inputs(B, T, h, E, k, D, torch.float32, repeat=(5,))
    calls = _count_unscaled(monkeypatch)
    y, qkv = triton_mosa._fwd_impl(x, scores, idx, w_qkv, w_o, 16, 10000.0, False, torch.float32)[:2]
    st = calls[0][1]
    counts = torch.zeros(B, T, dtype=torch.int32, device=DEVICE).index_put_(
        (torch.arange(B, device=DEVICE)[:, None, None].expand_as(idx), idx),
        torch.ones_like(idx, dtype=torch.int32), accumulate=True)
    assert torch.equal(st[triton_mosa._N_STATS:].view(B, T), counts)
    want = (counts.max().item(), qkv[2].abs().max().item(), scores.abs().max().item(), w_o.abs().max().item())
    assert st[:4].view(torch.float32).tolist() == pytest.approx(want, rel=1e-6)
    bound = want[0] * D * want[1] * want[2] * want[3]
    one, inv = torch.ones(1, dtype=torch.float16, device=DEVICE), torch.empty(1, device=DEVICE)
    triton_mosa._unscale[(1,)](one, inv, 1, st, D=D, BLOCK=16)
    s = 1.0 / inv.item()
    assert s == 2.0 ** round(math.log2(s))
    assert 2 ** 12 <= s * bound < 2 ** 13
    # distinct positions (top-k's): n is E, uncounted
    triton_mosa._fwd_impl(x, scores, idx, w_qkv, w_o, 16, 10000.0, False, torch.float32, distinct=True)
    st = calls[1][1]
    assert st.numel() == triton_mosa._N_STATS and st[:1].view(torch.float32).item() == E


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_gradients_in_row_slices(monkeypatch, dtype, split):
    # WGRAD_SPLIT forced: _dwqkv and _dwo reduce over slices of a head's rows, each program adding its partial
    # sums into zeroed float32 (then copied into bf16 / fp16 gradients; float32 ones take them in place).
    # Slices shorter than the rest (R off the blocks), one row block only (k = 2: one slice), the router's
    # gradient inside _dwqkv, three unfused parts (float32) and the fused one (float16)
    monkeypatch.setattr(triton_mosa, "WGRAD_SPLIT", split)
    launch, seen = triton_mosa._launch, []
    monkeypatch.setattr(triton_mosa, "_launch", lambda kernel, grid, args, blocks, **meta: (
        seen.append((kernel.fn.__name__, meta.get("SPLIT"), grid(blocks))), launch(kernel, grid, args, blocks, **meta))[1])
    _compare(2, 40, 48, 3, 17, 32, 16, dtype)                       # R = 34: h off the blocks
    _compare(1, 150, 32, 2, 100, 32, 16, dtype)                     # R = 100: the last slice shorter
    _compare(1, 20, 32, 2, 2, 32, 16, dtype)                        # k = 2, batch 1: R = 2, one slice
    _compare(2, 30, 32, 2, 10, 32, 16, dtype, pad=2, unsorted=True)
    monkeypatch.setattr(triton_mosa, "DWR_IN_DWQKV", True)
    # the router's gradient inside _dwqkv; R = 200: three or four row blocks in either dtype's tiles
    _routed_compare(2, 120, 32, 3, 100, 64, 64, False, dtype, TOL[dtype], False)
    splits = {(name, s) for name, s, _ in seen if name in ("_dwqkv", "_dwo")}
    assert ("_dwqkv", split) in splits and ("_dwo", split) in splits, splits
    assert ("_dwqkv", 1) in splits  # R = 2: one row block, one slice
    for name, s, grid in seen:
        if name == "_dwqkv":
            assert grid[2] == s * (1 if dtype != torch.float32 else 3)
        if name == "_dwo":
            assert grid[2] == s


def test_weight_gradient_split_choice(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(triton_mosa, "_sm_count", lambda dev: 132)
    # t1: 68 programs, R = 512 in 128-row blocks: too few blocks, one slice
    assert triton_mosa._wgrad_split(cuda, 68, 512, 128, False, False) == 1
    # a sparsity of 4 (R = 4096, 32 blocks): four slices bring 68 programs to two per SM; 8 (16 blocks): one
    assert triton_mosa._wgrad_split(cuda, 68, 4096, 128, False, False) == 4
    assert triton_mosa._wgrad_split(cuda, 68, 2048, 128, False, False) == 1
    assert triton_mosa._wgrad_split(cuda, 8, 32768, 128, False, False) == 8  # at most WGRAD_MAX_SPLIT
    # t3 (2,020 programs), deterministic scatters, beside a hybrid's dense heads, the CPU: one
    assert triton_mosa._wgrad_split(cuda, 2020, 256, 64, False, False) == 1
    assert triton_mosa._wgrad_split(cuda, 68, 4096, 128, True, False) == 1
    assert triton_mosa._wgrad_split(cuda, 68, 4096, 128, False, True) == 1
    assert triton_mosa._wgrad_split(torch.device("cpu"), 68, 4096, 128, False, False) == 1
    # the weight gradients on a stream of their own (WGRAD_SIDE_STREAM), whose programs fill the SMs instead
    assert triton_mosa._wgrad_split(cuda, 68, 4096, 128, False, False, fork=object()) == 1
    monkeypatch.setattr(triton_mosa, "WGRAD_SPLIT", 8)
    assert triton_mosa._wgrad_split(cuda, 2020, 256, 64, True, True) == 4  # forced, at most one slice per block


def test_weight_gradient_stream_choice(monkeypatch):
    # a stream of their own where the op runs alone on a GPU (beside a hybrid's dense heads and on the CPU, none)
    monkeypatch.setattr(triton_mosa, "Fork", lambda dev, key: ("fork", key))
    # while a CUDA graph is being captured (eagerly the host pays more than the GPU gains), and for heads of at
    # least WGRAD_SIDE_MIN_ROWS rows (t1: 512; 60 heads of k = 64 at B = 1: 64, none)
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert triton_mosa._wgrad_side_stream(cuda, False, 512) is not None
    assert triton_mosa._wgrad_side_stream(cuda, False, 64) is None
    assert triton_mosa._wgrad_side_stream(cuda, True, 512) is None
    assert triton_mosa._wgrad_side_stream(cpu, False, 512) is None
    capturing[0] = False
    assert triton_mosa._wgrad_side_stream(cuda, False, 512) is None
    monkeypatch.setattr(triton_mosa, "WGRAD_SIDE_STREAM", True)
    assert triton_mosa._wgrad_side_stream(cuda, True, 64) is not None
    assert triton_mosa._wgrad_side_stream(cpu, True, 512) is None
    monkeypatch.setattr(triton_mosa, "WGRAD_SIDE_STREAM", False)
    assert triton_mosa._wgrad_side_stream(cuda, False, 512) is None


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dense", [0, 2], ids=["mosa_heads", "hybrid"])
def test_layer_on_a_second_gpu_while_the_first_is_current(dense, compiled):
    # Triton launches on the current device: a layer moved to cuda:1 while cuda:0 is current runs its kernels on
    # cuda:1 (without the switch they failed, "Pointer argument cannot be accessed from Triton", or, once the two
    # GPUs had peer access, ran on cuda:0 over the link, unordered with cuda:1's stream) and gives what the same
    # layer gives on cuda:0 (output, x's and every weight's gradient; float32); eagerly and under torch.compile
    # (inductor's code around the custom ops)
    import copy
    from torch.profiler import ProfilerActivity, profile
    from mosa_attention.layers import MoSAAttention
    if DEVICE == "cpu" or torch.cuda.device_count() < 2:
        pytest.skip("two GPUs")
    torch.manual_seed(0)
    layer = MoSAAttention(64, 3, 4, head_dim=32, num_dense_heads=dense, backend="triton")
    x, dy = torch.randn(2, 64, 64), torch.randn(2, 64, 64)
    results = []
    with torch.cuda.device(0):
        for dev in ("cuda:0", "cuda:1"):  # (each from the CPU: no copy between the GPUs, no peer access)
            on = copy.deepcopy(layer).to(dev)
            run = torch.compile(on) if compiled else on
            xd = x.to(dev).requires_grad_()
            if compiled:  # (compiled once outside the profile)
                run(xd).sum().backward()
                xd.grad = None
                on.zero_grad(set_to_none=True)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                y = run(xd)
                y.backward(dy.to(dev))
                torch.cuda.synchronize(dev)
            results.append([y.detach().cpu(), xd.grad.cpu()] + [p.grad.cpu() for p in on.parameters()])
            assert torch.cuda.current_device() == 0
            ran = {e.device_index for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.name.startswith("_")}
            assert ran == {int(dev[-1])}, (dev, ran)
    for a, b in zip(*results):
        assert _rel(b, a.double()) < 1e-5


@pytest.mark.parametrize("fork", [None, False], ids=["default", "no_fork"])
def test_cuda_graph_step_matches_eager(monkeypatch, fork):
    # the op alone, forward + backward captured as a CUDA graph, where WGRAD_SIDE_STREAM's default forks the
    # weight gradients onto their own stream: each replay (fresh inputs copied in) gives the eager step's output
    # and gradients
    from mosa_attention.bench.layer import capture_graph
    if DEVICE == "cpu":
        pytest.skip("CUDA graphs")
    monkeypatch.setattr(triton_mosa, "WGRAD_SIDE_STREAM", fork)
    forks = []
    make = triton_mosa.Fork
    monkeypatch.setattr(triton_mosa, "Fork", lambda *a: (forks.append(a), make(*a))[1])
    B, T, h, E, k, D = 4, 256, 64, 3, 64, 32  # R = 256 rows per head
    static = [t.clone() for t in _inputs(B, T, h, E, k, D, torch.float16)]
    x, scores, idx, w_qkv, w_o = static
    leaves = [t.requires_grad_() for t in (x, scores, w_qkv, w_o)]
    dy = torch.randn(B, T, h, device=DEVICE, dtype=torch.float16)
    outs = []

    def step():
        for t in leaves:
            t.grad = None
        outs.append(sparse_attention_triton(x, scores, idx, w_qkv, w_o, 16, 10000.0))
        outs[-1].backward(dy)
        return outs[-1]
    replay, why = capture_graph(step)
    assert replay is not None, why
    y_static = outs[-1]
    grads_static = [t.grad for t in leaves]  # the graph's own (the eager steps below make new ones)
    assert bool(forks) == (fork is None)  # forked in the capture only where the default says so
    for _ in range(2):
        fresh = _inputs(B, T, h, E, k, D, torch.float16)
        with torch.no_grad():
            for t, new in zip(static, fresh):
                t.copy_(new)
            dy.copy_(torch.randn_like(dy))
        replay()
        torch.cuda.synchronize()
        got = [y_static.clone()] + [g.clone() for g in grads_static]
        want = [step().detach()] + [t.grad for t in leaves]
        for a, b in zip(got, want):
            assert _rel(a, b.double()) < 2e-3


def test_layer_under_compiled_cuda_graphs_matches_eager(monkeypatch):
    # torch.compile(mode="reduce-overhead") records the layer's forward and backward as CUDA graphs (cudagraph
    # trees), where WGRAD_SIDE_STREAM's default forks the weight gradients onto their own stream: every step, fresh
    # inputs, gives the eager layer's output and gradients (x's and every weight's)
    from mosa_attention.layers import MoSAAttention
    if DEVICE == "cpu":
        pytest.skip("CUDA graphs")
    forks = []
    make = triton_mosa.Fork
    monkeypatch.setattr(triton_mosa, "Fork", lambda *a: (forks.append(a), make(*a))[1])
    torch.manual_seed(0)
    eager = MoSAAttention(64, 3, 4, head_dim=32, backend="triton").to(DEVICE, torch.float16)  # k = 64: R = 256
    for step, (want, got) in enumerate(eager_and_graphed_steps(eager, (4, 256, 64), torch.float16)):
        for a, b in zip(want, got):
            assert _rel(b, a.double()) < 2e-3, step
    assert forks  # the recorded backward took the fork


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_gradients_on_their_own_stream(monkeypatch, dtype):
    # WGRAD_SIDE_STREAM's control flow, with a stand-in for the fork on the CPU (on a GPU every test of the op
    # alone runs the real one): _dwo, _dwr and _dwqkv are launched on the weight gradients' stream, after it
    # has waited for the launches they need, x's gradient on the caller's, and the caller's stream waits for the
    # fork before the gradients are handed back; the gradients match the reference (atomic and deterministic
    # scatters, the router's gradient inside _dwqkv or in _dwr, dw_o inside _out_bwd, the attention's backward
    # inside _out_bwd or after it)
    if DEVICE != "cpu":
        pytest.skip("a stand-in fork: the CPU only")
    events, current = [], ["main"]

    class Fork:
        def run(self, fn, wait=True):
            if wait:
                events.append(("wait", "side", "main"))
            current[0] = "side"
            try:
                return fn()
            finally:
                current[0] = "main"

        def join(self):
            events.append(("wait", "main", "side"))
    monkeypatch.setattr(triton_mosa, "_wgrad_side_stream", lambda dev, beside, R: None if beside else Fork())
    launch = triton_mosa._launch
    monkeypatch.setattr(triton_mosa, "_launch", lambda kernel, *a, **kw: (
        events.append(("launch", kernel.fn.__name__, current[0])), launch(kernel, *a, **kw))[1])
    for deterministic in (False, True):
        _compare(2, 40, 48, 3, 17, 32, 16, dtype, deterministic=deterministic)
    monkeypatch.setattr(triton_mosa, "DWR_IN_DWQKV", True)
    _routed_compare(2, 40, 48, 3, 9, 32, 16, True, dtype, TOL[dtype], False)
    monkeypatch.setattr(triton_mosa, "ATTN_IN_OUT_BWD", True)  # dqkv made by _out_bwd: one wait of the fork
    _routed_compare(2, 40, 48, 3, 9, 32, 16, True, dtype, TOL[dtype], False)
    monkeypatch.setattr(triton_mosa, "ATTN_IN_OUT_BWD", None)
    monkeypatch.setattr(triton_mosa, "DWO_IN_OUT_BWD", True)
    _compare(2, 30, 32, 2, 10, 32, 16, dtype)
    monkeypatch.setattr(triton_mosa, "DWR_IN_DWQKV", False)  # the router's weight gradient in _dwr
    _routed_compare(2, 40, 48, 3, 9, 32, 16, False, dtype, TOL[dtype], False)
    where = {(e[1], e[2]) for e in events if e[0] == "launch"}
    assert {("_dwo", "side"), ("_dwqkv", "side"), ("_dwr", "side"), ("_qkv_bwd_dx", "main"),
            ("_out_bwd", "main")} <= where, where
    assert not {("_dwo", "main"), ("_dwqkv", "main"), ("_dwr", "main"), ("_qkv_bwd_dx", "side")} & where, where
    # every backward: each launch on the fork comes after a wait of the fork that follows the last launch on this
    # stream of what it reads (_out_bwd's results, dqkv), and this stream waits for the fork before the next
    # forward
    backwards = [i for i, e in enumerate(events) if e[:2] == ("launch", "_out_bwd")]
    assert len(backwards) == 6
    waits_per_backward = []
    for start, end in zip(backwards, backwards[1:] + [len(events)]):
        part = events[start:end]
        join = part.index(("wait", "main", "side"))
        assert not any(e[0] == "launch" and e[1] == "_qkv_fwd" for e in part[:join])
        last_wait = None
        for i, e in enumerate(part[:join]):
            if e == ("wait", "side", "main"):
                last_wait = i
            elif e[0] == "launch" and e[2] == "side":
                assert last_wait is not None, part
                needs = "_out_bwd" if e[1] in ("_dwo", "_dwr") else ("_out_bwd", "_attn_bwd_seqs", "_attn_bwd_dq")
                made = max(j for j, f in enumerate(part[:i]) if f[0] == "launch" and f[2] == "main" and f[1] in needs)
                assert made < last_wait, part
        waits_per_backward.append(sum(e == ("wait", "side", "main") for e in part[:join]))
    assert waits_per_backward[3] == 1 and 2 in waits_per_backward  # attention inside _out_bwd: one wait

    # beside a hybrid's dense heads: no fork
    events.clear()
    _compare(2, 40, 48, 3, 17, 32, 16, dtype, beside=True)
    assert not any(e[0] == "wait" or (e[0] == "launch" and e[2] == "side") for e in events)


@pytest.mark.parametrize("dl16", [True, False], ids=["dl_tile_loaded", "dl_tile_in_registers"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_router_gradient_tile_forms(monkeypatch, dtype, dl16):
    # the router's weight gradient inside _dwqkv from the [rows, 16] d-logit tile _out_bwd writes (DL16_TILE),
    # or from one made in registers: padding slots (k > kept tokens of a short T), include_first, k = T
    monkeypatch.setattr(triton_mosa, "DL16_TILE", dl16)
    monkeypatch.setattr(triton_mosa, "DWR_IN_DWQKV", True)
    launch, seen = triton_mosa._launch, []
    monkeypatch.setattr(triton_mosa, "_launch", lambda kernel, *a, **kw: (
        seen.append((kernel.fn.__name__, kw.get("DL16"))), launch(kernel, *a, **kw))[1])
    _routed_compare(2, 40, 48, 3, 9, 32, 16, True, dtype, TOL[dtype], False)
    _routed_compare(1, 24, 32, 2, 24, 64, 64, False, dtype, TOL[dtype], False)
    _routed_compare(2, 40, 48, 3, 9, 32, 16, False, dtype, TOL[dtype], True)  # deterministic scatters
    assert ("_dwqkv", dl16) in seen and ("_out_bwd", dl16) in seen


def _random_cases(n: int, seed: int):
    """Shapes drawn from a seeded generator, beyond the hand-picked ones above: widths that are not multiples of
    the kernels' vectors (h = 4, 12, 20, 130), head dims 8 to 128 with RoPE on none, two, half or all of them,
    k from 2 to T, padding, unsorted positions, both scatter modes, and the router-fused op; float32 and float16
    (the same cases on a GPU and under the interpreter; bfloat16 has the hand-picked cases on a GPU)."""
    import random

    rng = random.Random(seed)
    for i in range(n):
        T = rng.choice([2, 3, 5, 17, 33, 65, 100])
        D = rng.choice([8, 16, 24, 48, 80, 128])
        k = rng.randint(2, T)
        yield dict(B=rng.choice([1, 2, 3]), T=T, h=rng.choice([4, 12, 20, 40, 130]), E=rng.choice([1, 2, 5]), k=k,
                   D=D, rope_dims=rng.choice([0, 2, D // 2, D]), dtype=rng.choice([torch.float32, torch.float16]),
                   deterministic=rng.choice([None, True]), routed=rng.random() < 0.5,
                   include_first=rng.random() < 0.5, pad=rng.randint(0, k - 1) if rng.random() < 0.3 else 0,
                   unsorted=rng.random() < 0.3, seed=seed * 100 + i)


@pytest.mark.parametrize("case", list(_random_cases(10, seed=26)), ids=lambda c: "-".join(
    f"{k}{v}" for k, v in c.items() if k in ("B", "T", "h", "E", "k", "D", "routed")))
def test_random_shapes_match_reference(case):
    c = dict(case)
    tol = TOL[c["dtype"]] * (3 if c["dtype"] == torch.float16 else 1)  # float16 at shapes up to T = 100, h = 130
    torch.manual_seed(c.pop("seed"))
    if c.pop("routed"):
        _routed_compare(c["B"], c["T"], c["h"], c["E"], c["k"], c["D"], c["rope_dims"], c["include_first"],
                        c["dtype"], tol, c["deterministic"])
    else:
        _compare(c["B"], c["T"], c["h"], c["E"], c["k"], c["D"], c["rope_dims"], c["dtype"], pad=c["pad"],
                 unsorted=c["unsorted"], deterministic=c["deterministic"], tol=tol)


@pytest.mark.parametrize("dense_heads", [0, 1], ids=["pure", "hybrid"])
def test_compiled_layer_hands_the_op_narrow_x_under_autocast(monkeypatch, dense_heads):
    # COMPILED_NARROW_INPUT: under torch.compile and autocast over float32 x the layer casts x before the fused
    # op (so that a compiled model folds the cast into its norm); the op then sees float16 x, and the layer's
    # output and every gradient match the eager layer's, which hands the op the float32 x
    import mosa_attention.layers.mosa as layer_module
    import mosa_attention.ops.triton_mosa as tm
    from mosa_attention.layers import MoSAAttention
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    torch.manual_seed(11)
    layer = MoSAAttention(32, 3, 4, head_dim=16, num_dense_heads=dense_heads, backend="triton")
    x, g = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    seen, real = [], tm.mosa_triton

    def spy(x, *args, **kwargs):
        seen.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(tm, "mosa_triton", spy)
    monkeypatch.setattr(layer_module, "HYBRID_OP", False)  # the hybrid's parts as separate ops (the op: test_triton_hybrid)
    results = {}
    for narrow in (True, False):
        monkeypatch.setattr(layer_module, "COMPILED_NARROW_INPUT", narrow)
        for compiled in (False, True):
            torch._dynamo.reset()
            fn = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
            xs = x.clone().requires_grad_()
            del seen[:]
            with torch.autocast("cpu", dtype=torch.float16):
                y = fn(xs)
            assert seen == [torch.float16 if (compiled and narrow) else torch.float32]
            grads = torch.autograd.grad((y.float() * g).sum(), [xs, *layer.parameters()])
            assert grads[0].dtype == torch.float32
            results[narrow, compiled] = (y.detach().float(), *grads)
    want = results[False, False]
    for key in ((True, False), (False, True), (True, True)):
        for a, b in zip(results[key], want):
            # float16 products either way; x's gradient from the op adds in float16 when it takes float16 x
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 40, 48, 3, 9, 16), (1, 19, 32, 2, 19, 32), (2, 33, 32, 4, 2, 16)],
                         ids=["T40-k9", "B1-k=T", "k2"])
@pytest.mark.parametrize("launch", [(None, True), (16, True), (None, False)], ids=["split", "bm16", "whole-rows"])
def test_projection_after_the_attention_adds_into_a_given_y(monkeypatch, dtype, shape, launch):
    # _fwd_impl(project=False) makes the attention alone (o, lse; no y), project_into then adds the heads' rows
    # into a y made elsewhere (a hybrid's dense heads' y): y_other + the fused forward's y, padding slots dropped,
    # whatever its launch (rows per program, a program per column block or per row)
    monkeypatch.setattr(triton_mosa, "PROJECT_BM", launch[0])
    monkeypatch.setattr(triton_mosa, "PROJECT_SPLIT_H", launch[1])
    B, T, h, E, k, D = shape
    torch.manual_seed(T + k)
    x, scores, idx, w_qkv, w_o = _inputs(B, T, h, E, k, D, dtype, pad=1 if k > 2 else 0)
    overlap = E * B * k / (B * T)
    assert not triton_mosa.projects_in_place(x.device, h, dtype, overlap, True)  # (deterministic: never)
    if not triton_mosa.projects_in_place(x.device, h, dtype, overlap, False):
        # bfloat16 with more than one row per token on a GPU: the scaled float16 buffer, no projection after
        assert dtype == torch.bfloat16 and overlap > triton_mosa.NARROW_MAX_OVERLAP
        with pytest.raises(ValueError, match="project=False"):
            triton_mosa._fwd_impl(x, scores, idx, w_qkv, w_o, D // 2, 10000.0, False, dtype, project=False)
        return
    fused = triton_mosa._fwd_impl(x, scores, idx, w_qkv, w_o, D // 2, 10000.0, False, dtype)
    alone = triton_mosa._fwd_impl(x, scores, idx, w_qkv, w_o, D // 2, 10000.0, False, dtype, project=False)
    assert alone[0] is None
    for a, b in zip(alone[1:4], fused[1:4]):  # q k v, o, lse: the same kernels' values
        assert torch.equal(a, b)
    other = torch.randn(B, T, h, device=DEVICE, dtype=dtype)
    got = triton_mosa.project_into(other.clone(), alone[2], idx, scores, w_o)
    want = other.double() + fused[0].double()
    assert _rel(got, want) < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    # and against the plain-torch reference
    ref = sparse_attention_reference(*(t.double() if t.is_floating_point() else t for t in (x, scores, idx, w_qkv,
                                                                                             w_o)), rope_dims=D // 2)
    assert _rel(got, other.double() + ref) < {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]


def test_projection_after_needs_atomics_in_place():
    x, scores, idx, w_qkv, w_o = _inputs(1, 16, 32, 2, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="project=False"):
        triton_mosa._fwd_impl(x, scores, idx, w_qkv, w_o, 8, 10000.0, True, torch.float32, project=False)
