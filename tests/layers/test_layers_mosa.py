"""MoSAAttention against a per-head, per-sequence loop written here from the paper's equations."""
import math
import types

import pytest
import torch

from mosa_attention import DenseAttention, FixedSparseAttention, LocalAttention, MoSAAttention, RoutingAttention
from mosa_attention.ops import mosa, sparse_attention_reference


def rope_loop(v, pos, n_rot, base):
    """Rotate-half RoPE of one vector at one position, written out."""
    if n_rot == 0:
        return v
    half = n_rot // 2
    out = v.clone()
    for i in range(half):
        theta = pos * base ** (-2 * i / n_rot)
        c, s = math.cos(theta), math.sin(theta)
        a, b = v[i], v[i + half]
        out[i] = a * c - b * s
        out[i + half] = b * c + a * s
    return out


def mosa_loop(x, layer):
    """The paper's MoSA (plus dense/local heads) for every sequence and head, one at a time."""
    B, T, h = x.shape
    D, E = layer.head_dim, layer.num_mosa_heads
    k = min(max(int(T // layer.sparsity), 2), T)
    n_rot, base = layer.rope_dims, layer.rope_base
    out = []
    for b in range(B):
        y = torch.zeros(T, h, dtype=x.dtype)
        for e in range(E):
            r = torch.sigmoid(x[b] @ layer.router[e])
            if layer.include_first:
                rest = torch.topk(r[1:], k - 1).indices + 1
                keep = sorted([0] + rest.tolist())
            else:
                keep = sorted(torch.topk(r, k).indices.tolist())
            qkv = x[b, keep] @ layer.W_QKV[e]
            q, kk, v = qkv[:, :D], qkv[:, D:2 * D], qkv[:, 2 * D:]
            q = torch.stack([rope_loop(q[i], p, n_rot, base) for i, p in enumerate(keep)])
            kk = torch.stack([rope_loop(kk[i], p, n_rot, base) for i, p in enumerate(keep)])
            for i, pi in enumerate(keep):
                js = [j for j, pj in enumerate(keep) if pj <= pi]
                w = torch.softmax(torch.stack([q[i] @ kk[j] for j in js]) / math.sqrt(D), 0)
                o = sum(w[n] * v[j] for n, j in enumerate(js))
                y[pi] = y[pi] + (r[pi] * o) @ layer.W_O[e]
        if layer.dense is not None:
            H = layer.num_dense_heads
            qkv = (x[b] @ layer.dense.W_QKV.weight.T).view(T, H, 3 * D)
            window = k if layer.dense_kind == "local" else T
            heads = []
            for hd in range(H):
                q, kk, v = qkv[:, hd, :D], qkv[:, hd, D:2 * D], qkv[:, hd, 2 * D:]
                q = torch.stack([rope_loop(q[p], p, n_rot, base) for p in range(T)])
                kk = torch.stack([rope_loop(kk[p], p, n_rot, base) for p in range(T)])
                rows = []
                for i in range(T):
                    js = list(range(max(0, i - window + 1), i + 1))
                    w = torch.softmax(torch.stack([q[i] @ kk[j] for j in js]) / math.sqrt(D), 0)
                    rows.append(sum(w[n] * v[j] for n, j in enumerate(js)))
                heads.append(torch.stack(rows))
            y = y + torch.cat(heads, -1) @ layer.dense.W_O.weight.T
        out.append(y)
    return torch.stack(out)


CASES = [
    # B, T, h, E, sparsity, D, dense heads, dense kind, include_first, rope_fraction
    (2, 17, 12, 3, 4, 8, 0, "dense", False, 0.5),   # T not divisible by sparsity
    (1, 9, 8, 2, 100, 4, 0, "dense", False, 0.5),   # k = 2 (floor), batch 1
    (2, 6, 8, 2, 1, 4, 0, "dense", True, 1.0),      # k = T, full rotation
    (3, 11, 10, 4, 3, 6, 2, "dense", True, 0.5),    # hybrid dense, include_first
    (2, 13, 8, 2, 4, 8, 1, "local", False, 0.25),   # hybrid local: window k = 3
    (1, 8, 8, 1, 2.5, 4, 0, "dense", False, 0.0),   # float sparsity, no RoPE
]


@pytest.mark.parametrize("B,T,h,E,rho,D,Hd,kind,first,frac", CASES)
def test_layer_matches_loop(B, T, h, E, rho, D, Hd, kind, first, frac):
    layer = MoSAAttention(h, E, rho, head_dim=D, num_dense_heads=Hd, dense_kind=kind, include_first=first,
                          rope_fraction=frac).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    x = torch.randn(B, T, h, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref = mosa_loop(x, layer)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *layer.parameters()])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, *layer.parameters()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_router_gets_gradient():
    layer = MoSAAttention(8, 2, 2, head_dim=4)
    layer(torch.randn(2, 10, 8)).square().sum().backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0


@pytest.mark.parametrize("dense", [0, 1])
def test_gradcheck_float64(dense):
    layer = MoSAAttention(6, 2, 3, head_dim=4, num_dense_heads=dense).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_() for p in params]))


def test_no_dependence_on_later_tokens_with_selection_fixed():
    torch.manual_seed(1)
    B, T, h, E, D = 2, 16, 8, 3, 4
    x = torch.randn(B, T, h, dtype=torch.float64)
    wr, wq, wo = torch.randn(E, h, dtype=torch.float64), torch.randn(E, h, 3 * D, dtype=torch.float64), torch.randn(E, D, h, dtype=torch.float64)
    _, (scores, idx) = mosa(x, wr, wq, wo, 4, rope_dims=2, return_selection=True)
    t = 9
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn(B, T - t - 1, h, dtype=torch.float64)
    # same selection, future tokens changed (their scores too: the output at <= t must not move)
    s2 = torch.where(idx > t, torch.rand_like(scores), scores)
    y1 = sparse_attention_reference(x, scores, idx, wq, wo, 2)
    y2 = sparse_attention_reference(x2, s2, idx, wq, wo, 2)
    torch.testing.assert_close(y1[:, : t + 1], y2[:, : t + 1])
    assert not torch.allclose(y1[:, t + 1:], y2[:, t + 1:])


def test_batch_routes_independently():
    layer = MoSAAttention(8, 3, 4, head_dim=4, num_dense_heads=1)
    x = torch.randn(5, 12, 8)
    perm = torch.tensor([3, 0, 4, 2, 1])
    torch.testing.assert_close(layer(x)[perm], layer(x[perm]))
    torch.testing.assert_close(layer(x[:1]), layer(x)[:1])


def test_bfloat16_close_to_float32():
    layer = MoSAAttention(32, 4, 4, head_dim=16, num_dense_heads=2)
    x = torch.randn(2, 32, 32)
    y32 = layer(x)
    y16 = layer.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    # the selection can flip where router scores tie in bf16, so compare in aggregate
    assert (y16.float() - y32).norm() / y32.norm() < 0.05


def test_torch_compile_smoke():
    """One graph, no breaks, forward and backward through AOTAutograd (inductor works too but is slow on CI)."""
    layer = MoSAAttention(16, 2, 4, head_dim=8, num_dense_heads=1)
    x = torch.randn(2, 16, 16, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    g_compiled, = torch.autograd.grad(y.sum(), x)
    g_eager, = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.parametrize("kind", ["mosa", "dense", "fixed", "routing"])
def test_layers_of_other_hyperparameters_compile_in_one_process(kind):
    # a float attribute that differs between two instances of a class turns symbolic under torch.compile (automatic
    # dynamic shapes): the layers keep sparsity and RoPE's base as exact int ratios (layers._checks.exact_float), so
    # each of these layers still compiles into one graph with its own k and base, and reads back the floats it got
    from mosa_attention.layers import DenseAttention, FixedSparseAttention, RoutingAttention
    from mosa_attention.ops import num_selected
    make = {"mosa": lambda s, b: MoSAAttention(16, 2, s, head_dim=8, num_dense_heads=1, rope_base=b),
            "dense": lambda s, b: DenseAttention(16, 2, head_dim=8, rope_base=b),
            "fixed": lambda s, b: FixedSparseAttention(16, 2, s, head_dim=8, rope_base=b),
            "routing": lambda s, b: RoutingAttention(16, 2, s, head_dim=8, rope_base=b, seq_len=16).eval()}[kind]
    for sparsity, base in ((8, 10000.0), (4, 500.0), (2.5, 123.25), (3, 1e6 / 3)):
        torch.manual_seed(0)
        layer = make(sparsity, base)
        x = torch.randn(2, 16, 16)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x))
        assert layer.rope_base == base and (kind == "dense" or layer.sparsity == sparsity)
        if kind == "mosa":
            assert layer.select(x)[1].shape[-1] == num_selected(16, sparsity) == max(int(16 // sparsity), 2)


@pytest.mark.parametrize("bad,match", [
    (lambda l: l(torch.randn(4, 8)), "x must have shape"),
    (lambda l: l(torch.randn(1, 4, 7)), "d_model=8"),
    (lambda l: l(torch.randn(1, 0, 8)), "at least one token"),
    (lambda l: l(torch.randn(0, 4, 8)), "at least one sequence"),
    (lambda l: l(torch.ones(1, 4, 8, dtype=torch.long)), "floating-point"),
    (lambda l: l(torch.randn(1, 4, 8, dtype=torch.float64)), "must match the layer's parameters"),
])
def test_bad_input(bad, match):
    layer = MoSAAttention(8, 2, 2, head_dim=4)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(layer)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=0.5), "sparsity"),
    (dict(sparsity=float("inf")), "sparsity"),
    (dict(sparsity=float("nan")), "sparsity"),
    (dict(num_mosa_heads=0), "at least one head"),
    (dict(dense_kind="sliding"), "dense_kind"),
    (dict(head_dim=0), "head_dim"),
    (dict(routing="random"), "routing"),
    (dict(rope_base=0.0), "rope_base=0.0"),
    (dict(rope_base=float("nan")), "rope_base=nan"),
    (dict(rope_fraction=1.5), "rope_fraction=1.5"),
    (dict(rope_fraction="0.5"), "rope_fraction='0.5'"),
    (dict(include_first="no"), "include_first='no'"),
    (dict(router_aux=1), "router_aux=1"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = dict(d_model=8, num_mosa_heads=2, sparsity=2, head_dim=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MoSAAttention(**args)


@pytest.mark.parametrize("change,match", [
    (dict(rope_dims=3), "rope_dims must be even"),
    (dict(rope_dims=10), "rope_dims must be even"),
    (dict(w_o=torch.randn(2, 5, 8)), "w_o must be"),
    (dict(w_qkv=torch.randn(2, 8, 13)), "w_qkv must be"),
    (dict(scores=torch.rand(1, 2, 4)), "scores must be floating with idx"),
    (dict(scores=torch.ones(1, 2, 3, dtype=torch.long)), "scores must be floating"),
    (dict(idx=torch.zeros(1, 2, 3)), "idx must be an integer"),
])
def test_functional_op_checks(change, match):
    from mosa_attention.ops import sparse_attention

    args = dict(x=torch.randn(1, 6, 8), scores=torch.rand(1, 2, 3), idx=torch.tensor([[[0, 2, 4], [1, 3, 5]]]),
                w_qkv=torch.randn(2, 8, 12), w_o=torch.randn(2, 4, 8), rope_dims=2)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        sparse_attention(**args)


@pytest.mark.parametrize("seed", range(6))
def test_layer_matches_loop_random_shapes(seed):
    """Shapes drawn at random (fixed seeds): forward and the input gradient against the loop."""
    g = torch.Generator().manual_seed(seed)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    B, T, h, E, D = pick(1, 3), pick(2, 20), pick(2, 12), pick(1, 4), 2 * pick(1, 4)
    rho = float(torch.empty(1).uniform_(1, 8, generator=g))
    Hd = pick(0, 2)
    kind = ("dense", "local")[pick(0, 1)]
    layer = MoSAAttention(h, E, rho, head_dim=D, num_dense_heads=Hd, dense_kind=kind,
                          include_first=bool(pick(0, 1)), rope_fraction=(0.0, 0.5, 1.0)[pick(0, 2)]).double()
    x = torch.randn(B, T, h, dtype=torch.float64, generator=g, requires_grad=True)
    y, ref = layer(x), mosa_loop(x, layer)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    w = torch.randn(y.shape, dtype=torch.float64, generator=g)
    torch.testing.assert_close(torch.autograd.grad((y * w).sum(), x)[0], torch.autograd.grad((ref * w).sum(), x)[0])


def test_reference_under_cpu_autocast():
    """The reference backend under autocast (x float32, projections in bf16) runs and stays close."""
    layer = MoSAAttention(32, 3, 4, head_dim=16, num_dense_heads=1, backend="torch")
    x = torch.randn(2, 24, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert layer.W_QKV.grad is not None
    # the selection can flip where bf16 router scores tie, so compare in aggregate
    assert (y.float() - layer(x)).norm() / layer(x).norm() < 0.05


def test_hybrid_heads_share_one_stream_off_cuda_and_under_compile(monkeypatch):
    # the second stream for a hybrid's MoSA heads is a CUDA-only overlap: CPU layers, MoSA-only layers,
    # compiled graphs and distributed runs keep one stream (the GPU check compares both on a card:
    # benchmarks/bench_layer.py --check-streams)
    import mosa_attention.layers.mosa as layer_module
    hybrid = MoSAAttention(32, 2, 4, head_dim=16, num_dense_heads=1)
    x = torch.randn(1, 8, 32)
    assert hybrid._side_stream(x) is None
    assert MoSAAttention(32, 2, 4, head_dim=16)._side_stream(x) is None
    # a stand-in for a CUDA tensor: the answer is None before any stream would be made
    on_cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    monkeypatch.setattr(layer_module, "PARALLEL_HEADS", False)
    assert hybrid._side_stream(on_cuda) is None
    monkeypatch.setattr(layer_module, "PARALLEL_HEADS", True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert hybrid._side_stream(on_cuda) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # DDP / FSDP runs: one stream
    assert hybrid._side_stream(on_cuda) is None


@pytest.mark.parametrize("kind", ["dense", "local"])
def test_hybrid_shared_input_gradient_equals_two_readers(monkeypatch, kind):
    """The MoSA heads reading x through the dense heads' product (x's two gradients summed in that product's
    backward) give the same output and gradients as both reading x."""
    import mosa_attention.layers.mosa as layer_module
    torch.manual_seed(4)
    layer = MoSAAttention(16, 3, 4, head_dim=8, num_dense_heads=2, dense_kind=kind).double()
    x = torch.randn(2, 20, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 20, 16, dtype=torch.float64)
    results = []
    for shared in (True, False):
        monkeypatch.setattr(layer_module, "SHARED_INPUT_GRAD", shared)
        y = layer(x)
        results.append((y, *torch.autograd.grad((y * g).sum(), [x, *layer.parameters()])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the default (None) shares only where x is wider than the product's dtype: autocast over float32
    monkeypatch.setattr(layer_module, "SHARED_INPUT_GRAD", None)
    assert not layer._sharing(x, None)[0]
    x32 = torch.randn(2, 20, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._sharing(x32, None)[0]
        with torch.no_grad():
            assert not layer._sharing(x32, None)[0]


@pytest.mark.parametrize("make", [
    lambda **kw: DenseAttention(8, 2, head_dim=4, **kw),
    lambda **kw: LocalAttention(8, 2, 3, head_dim=4, **kw),
    lambda **kw: FixedSparseAttention(8, 2, 2, head_dim=4, **kw),
    lambda **kw: RoutingAttention(8, 2, 2, head_dim=4, seq_len=8, **kw),
], ids=["dense", "local", "fixed", "routing"])
def test_baselines_reject_bad_rope_settings(make):
    # (before: accepted, then NaN outputs for a base <= 0 or an error deep in the forward for the fraction)
    for kw, match in ((dict(rope_base=-1.0), "rope_base=-1.0"), (dict(rope_fraction=2.0), "rope_fraction=2.0")):
        with pytest.raises(ValueError, match=match):
            make(**kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the second stream is CUDA's")
@pytest.mark.parametrize("aux", [False, True], ids=["router-fused", "given-selection"])
def test_hybrid_tells_the_op_it_runs_beside_the_dense_heads(monkeypatch, aux):
    # on CUDA a hybrid's MoSA heads run on a second stream beside the dense heads, and the Triton op is told
    # (``beside``: the backward then takes the kernels that share the GPU); a MoSA-only layer runs alone
    import mosa_attention.layers.mosa as layer_module
    seen = []
    for name in ("mosa_topk_fused", "sparse_attention"):
        real = getattr(layer_module, name)
        monkeypatch.setattr(layer_module, name, lambda *a, _real=real, **kw: (seen.append(kw["beside"]),
                                                                               _real(*a, **kw))[1])
    x = torch.randn(2, 64, 64, device="cuda")
    for dense, want in ((2, True), (0, False)):
        layer = MoSAAttention(64, 3, 4, head_dim=16, num_dense_heads=dense, router_aux=aux).cuda().train()
        seen.clear()
        layer(x).sum().backward()
        assert seen == [want]
