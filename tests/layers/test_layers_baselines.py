"""Dense, local, fixed-sparse and routing attention against direct computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from mosa_attention import DenseAttention, FixedSparseAttention, LocalAttention, MoSAAttention, RoutingAttention
from mosa_attention.ops import apply_rope, rope_cos_sin


def naive_attention(q, k, v, allowed):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


def qkv_of(layer, x):
    B, T, _ = x.shape
    q, k, v = (x @ layer.W_QKV.weight.T).view(B, T, layer.num_heads, -1).transpose(1, 2).chunk(3, -1)
    cos, sin = rope_cos_sin(torch.arange(T), layer.rope_dims, layer.rope_base, x.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


@pytest.mark.parametrize("window", [None, 1, 3, 50])
def test_dense_and_local(window):
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    layer = (DenseAttention(16, 3, head_dim=8) if window is None else LocalAttention(16, 3, window, head_dim=8)).double()
    q, k, v = qkv_of(layer, x)
    i = torch.arange(11)
    d = i[:, None] - i[None, :]
    allowed = (d >= 0) & (d < (window or 11))
    o = naive_attention(q, k, v, allowed).transpose(1, 2).reshape(2, 11, -1)
    torch.testing.assert_close(layer(x), o @ layer.W_O.weight.T)


@pytest.mark.parametrize("T,window", [(100, 7), (67, 16), (200, 40)])
def test_local_layer_in_chunks(monkeypatch, T, window):
    # the chunked path (ops.local_attention; by default above T = 4096) inside the layer, whose q, k, v are
    # strided views of the projection: output and gradients against the direct computation
    from mosa_attention.ops import attention as attention_ops
    monkeypatch.setattr(attention_ops, "LOCAL_MASK_MAX_T", 0)
    torch.manual_seed(T)
    x = torch.randn(2, T, 16, dtype=torch.float64, requires_grad=True)
    layer = LocalAttention(16, 3, window, head_dim=8).double()
    i = torch.arange(T)
    allowed = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < window)
    g = torch.randn(2, T, 16, dtype=torch.float64)
    got = layer(x)
    grads = torch.autograd.grad((got * g).sum(), (x, layer.W_QKV.weight, layer.W_O.weight))
    q, k, v = qkv_of(layer, x)
    want = naive_attention(q, k, v, allowed).transpose(1, 2).reshape(2, T, -1) @ layer.W_O.weight.T
    expect = torch.autograd.grad((want * g).sum(), (x, layer.W_QKV.weight, layer.W_O.weight))
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, expect):
        torch.testing.assert_close(a, b)


def test_dense_layer_equals_mosa_layer_dense_heads():
    mosa = MoSAAttention(16, 1, 4, head_dim=8, num_dense_heads=2)
    with torch.no_grad():
        mosa.W_O.zero_()
    dense = DenseAttention(16, 2, head_dim=8)
    dense.load_state_dict(mosa.dense.state_dict())
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(mosa(x), dense(x))


def test_fixed_sparse_attends_only_strided_tokens():
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    layer = FixedSparseAttention(8, 2, 3, head_dim=4).double()
    keep = [0, 3, 6, 9]
    y = layer(x)
    other = [t for t in range(10) if t not in keep]
    assert torch.all(y[:, other] == 0)
    # the kept tokens: plain causal attention among them with RoPE at their positions
    D = 4
    ref = torch.zeros_like(y)
    for e in range(2):
        qkv = x[:, keep] @ layer.W_QKV[e]
        q, k, v = qkv.split(D, -1)
        cos, sin = rope_cos_sin(torch.tensor(keep), layer.rope_dims, layer.rope_base, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = naive_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool).tril())
        ref[:, keep] += o @ layer.W_O[e]
    torch.testing.assert_close(y, ref)
    # a later token never changes an earlier output
    x2 = x.clone()
    x2[:, 7:] += 1
    torch.testing.assert_close(layer(x2)[:, :7], y[:, :7])


def test_routing_attention_clusters_and_learns():
    torch.manual_seed(0)
    layer = RoutingAttention(16, 2, 4, head_dim=8, seq_len=16)
    assert layer.n_clusters == 4
    x = torch.randn(3, 16, 16, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0 and layer.W_QV.grad.abs().sum() > 0
    before = layer.centroids.clone()
    layer.train()
    layer(x.detach())
    assert not torch.allclose(layer.centroids, before)
    torch.testing.assert_close(layer.centroids.norm(dim=-1), torch.ones(2, 4))
    layer.eval()
    c = layer.centroids.clone()
    layer(x.detach())
    assert torch.equal(c, layer.centroids)


def test_routing_matches_direct_computation():
    torch.manual_seed(3)
    layer = RoutingAttention(8, 1, 2, head_dim=4, seq_len=8).double().eval()
    x = torch.randn(1, 8, 8, dtype=torch.float64)
    q, v = (x[0] @ layer.W_QV[0]).split(4, -1)
    sim = F.normalize(q, dim=-1) @ layer.centroids[0].T  # [T, C]
    out = torch.zeros(8, 4, dtype=torch.float64)
    for c in range(layer.n_clusters):
        keep = sorted(sim[:, c].topk(4).indices.tolist())
        cos, sin = rope_cos_sin(torch.tensor(keep), layer.rope_dims, layer.rope_base, x.dtype)
        qk = apply_rope(q[keep], cos, sin)
        out[keep] += naive_attention(qk, qk, v[keep], torch.ones(4, 4, dtype=torch.bool).tril())
    torch.testing.assert_close(layer(x)[0], out @ layer.W_O[0])
