"""ops.attention's plain-torch pieces: the shared-input product of a hybrid, and local (sliding-window)
attention: the chunks, the one-mask reference and the FlexAttention block mask."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from mosa_attention.ops import linear_sharing_input
from mosa_attention.ops.attention import _addmm


def _two_readers(x, w, g1, g2, shared: bool):
    """y = x w^T read by one loss term, x read by a second (through the second output when shared)."""
    if shared:
        y, x2 = linear_sharing_input(x, w)
    else:
        y, x2 = F.linear(x, w), x
    return (y.float() * g1).sum() + (x2.float().sin() * g2).sum()


@pytest.mark.parametrize("second_reader", [True, False])
def test_gradients_equal_two_separate_readers(second_reader):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    g1 = torch.randn(2, 5, 12, dtype=torch.float64)
    g2 = torch.randn(2, 5, 8, dtype=torch.float64) * second_reader
    got = torch.autograd.grad(_two_readers(x, w, g1, g2, True), (x, w))
    want = torch.autograd.grad(_two_readers(x, w, g1, g2, False), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_only_the_product_read():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y, _ = linear_sharing_input(x, w)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad((y * g).sum(), (x, w))
    torch.testing.assert_close(dx, g @ w)
    torch.testing.assert_close(dw, g.reshape(-1, 5).t() @ x.reshape(-1, 6))
    torch.testing.assert_close(y, x @ w.t())


def test_gradcheck():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: tuple(o * 1.0 for o in linear_sharing_input(x, w)), (x, w))


def test_under_cpu_autocast_like_linear():
    """x and w float32 under bf16 autocast: the product in bf16 as F.linear's, gradients in float32."""
    torch.manual_seed(2)
    x = torch.randn(2, 6, 16, requires_grad=True)
    w = torch.randn(24, 16, requires_grad=True)
    g1, g2 = torch.randn(2, 6, 24), torch.randn(2, 6, 16)
    outs = []
    for shared in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = linear_sharing_input(x, w)[0] if shared else F.linear(x, w)
            loss = _two_readers(x, w, g1, g2, shared)
        outs.append((y, *torch.autograd.grad(loss, (x, w))))
    assert outs[0][0].dtype == torch.bfloat16
    assert outs[0][1].dtype == torch.float32 and outs[0][2].dtype == torch.float32
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_addmm_wide_accumulator():
    """A float32 accumulator plus a bf16 product stays float32 (off CUDA: product, then one add)."""
    torch.manual_seed(3)
    c = torch.randn(4, 3)
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(8, 3).bfloat16()
    got = _addmm(c, a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, c + (a.float() @ b.float()), rtol=1e-2, atol=1e-2)



def test_rows_hand_out_x_in_the_product_dtype_under_autocast():
    """With rows, the second output is the product's bf16 copy of x; the other reader's gradient (zero off
    the rows) comes back in bf16 and is added at the rows into the product's float32 one."""
    torch.manual_seed(4)
    x = torch.randn(2, 6, 16, requires_grad=True)
    w = torch.randn(24, 16, requires_grad=True)
    rows = torch.rand(2, 6) < 0.5
    g1, g2 = torch.randn(2, 6, 24), torch.randn(2, 6, 16) * rows[..., None]
    outs = []
    for shared in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if shared:
                y, x2 = linear_sharing_input(x, w, rows)
                assert x2.dtype == torch.bfloat16 and torch.equal(x2, x.bfloat16())
            else:
                y, x2 = F.linear(x, w), x.bfloat16()
            loss = (y.float() * g1).sum() + (x2.float().sin() * g2).sum()
        outs.append(torch.autograd.grad(loss, (x, w)))
    assert outs[0][0].dtype == torch.float32
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    # x_cast: the caller's copy is used as it is (and handed out)
    xc = x.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, x2 = linear_sharing_input(x, w, rows, x_cast=xc)
    assert x2.data_ptr() == xc.data_ptr() and torch.equal(y, F.linear(xc, w.bfloat16()))


# ------------------------------------------------------------------ local (sliding-window) attention
from mosa_attention.ops import attention as attention_ops  # noqa: E402
from mosa_attention.ops import local_attention, local_attention_reference  # noqa: E402


@pytest.mark.parametrize("B,H,T,D,window", [
    (1, 2, 100, 8, 1),     # each query sees itself only
    (2, 3, 97, 8, 2),      # T not a multiple of the chunk (16)
    (1, 1, 64, 4, 16),     # window = chunk, T = 4 chunks exactly
    (2, 2, 200, 16, 17),   # window one past a chunk: chunks of 32
    (1, 2, 333, 8, 50),
    (1, 1, 48, 8, 15),     # three chunks: the smallest chunked case
    (1, 1, 40, 8, 39),     # two chunks or fewer: the [T, T] mask
    (1, 1, 40, 8, 40),     # window = T: plain causal
    (1, 1, 40, 8, 100),    # window > T
])
def test_local_attention_matches_the_masked_reference(monkeypatch, B, H, T, D, window):
    monkeypatch.setattr(attention_ops, "LOCAL_MASK_MAX_T", 0)  # chunks at every length (the default: above 4096)
    torch.manual_seed(T + window)
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, T, D, dtype=torch.float64)
    got = local_attention(q, k, v, window)
    want = local_attention_reference(q, k, v, window)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad((got * g).sum(), (q, k, v)), torch.autograd.grad((want * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_local_attention_never_builds_a_sequence_square_mask(monkeypatch):
    """At T = 4096 with a window of 16 every mask SDPA gets has at most 2 * 16 entries per query (chunks of 16
    positions, each over its own and its predecessor's keys): O(T * window), not T * T."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(0 if attn_mask is None else attn_mask.numel())
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4096, 8) for _ in range(3))
    want = local_attention_reference(q, k, v, 16)
    monkeypatch.setattr(attention_ops.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(attention_ops, "LOCAL_MASK_MAX_T", 0)
    got = local_attention(q, k, v, 16)
    assert seen and max(seen) <= 4096 * 2 * 16, seen
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # by default: one [T, T] mask up to LOCAL_MASK_MAX_T, chunks beyond
    monkeypatch.undo()
    monkeypatch.setattr(attention_ops.F, "scaled_dot_product_attention", spy)
    seen.clear()
    local_attention(q, k, v, 16)
    assert seen == [4096 * 4096]
    seen.clear()
    x = torch.randn(1, 1, 8192, 4)
    local_attention(x, x, x, 16)
    assert seen and max(seen) <= 8192 * 2 * 16, seen


def test_local_attention_rejects_a_bad_window():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="window=0"):
        local_attention(q, q, q, 0)


# FlexAttention (the local heads' path on CUDA): the block mask is ours, the kernels are torch's. On CPU
# FlexAttention runs unfused and forward only, so these tests check the block mask and the forward; the
# compiled kernels' forward and gradients are checked on the card (benchmarks/bench_local.py: errors
# against a float32 run of the one-mask reference).


def _blocks(mask, i):
    n, f = int(mask.kv_num_blocks[0, 0, i]), int(mask.full_kv_num_blocks[0, 0, i])
    return mask.kv_indices[0, 0, i, :n].tolist(), mask.full_kv_indices[0, 0, i, :f].tolist()


@pytest.mark.parametrize("T,window,block", [(300, 40, 128), (257, 128, 128), (520, 300, 128), (64, 1, 128),
                                            (1000, 256, 128), (700, 700, 128), (100, 33, 16), (96, 48, 16)])
def test_sliding_window_block_mask_lists_exactly_the_blocks_in_the_window(T, window, block):
    # every (query block, key block) pair that holds a seen pair is listed once; "full" ones hold only seen pairs
    attention_ops._FLEX_MASKS.clear()
    mask = attention_ops.sliding_window_block_mask(T, window, "cpu", block)
    dense = attention_ops.sliding_window_mask(T, window)
    nb = -(-T // block)
    for i in range(nb):
        partial, full = _blocks(mask, i)
        assert not set(partial) & set(full)
        for j in range(nb):
            tile = dense[i * block:(i + 1) * block, j * block:(j + 1) * block]
            if j in full:
                assert tile.all(), (i, j)
            elif j in partial:
                assert tile.any() and not tile.all() or tile.shape[0] * tile.shape[1] == 1, (i, j)
            else:
                assert not tile.any(), (i, j)
    assert attention_ops.sliding_window_block_mask(T, window, "cpu", block) is mask  # cached


def test_sliding_window_block_mask_under_compile_is_made_in_the_graph_and_not_cached():
    # traced by torch.compile (dynamo; the eager backend keeps CI fast) the mask is made inside the graph: nothing
    # is cached (kept beyond a compiled graph, its tensors would belong to that graph's memory pool under CUDA
    # graphs, overwritten by the next replay) and nothing cached is read (a graph holding a cached mask as a
    # constant rounded the heads' output otherwise on an H200, so a deterministic run depended on what ran before)
    attention_ops._FLEX_MASKS.clear()

    def blocks(t):
        m = attention_ops.sliding_window_block_mask(300, 40, "cpu", 128)
        return t + torch.cat([m.kv_num_blocks.flatten(), 10 * m.full_kv_num_blocks.flatten()])

    want = blocks(torch.zeros(()))
    assert len(attention_ops._FLEX_MASKS) == 1
    attention_ops._FLEX_MASKS.clear()
    compiled = torch.compile(blocks, backend="eager", fullgraph=True)
    assert torch.equal(compiled(torch.zeros(())), want)
    assert not attention_ops._FLEX_MASKS
    # a wrong mask planted under the key: eager calls read it, a fresh trace does not
    attention_ops._FLEX_MASKS[300, 40, "cpu", 128] = attention_ops._make_sliding_window_block_mask(300, 1, "cpu", 128)
    assert not torch.equal(blocks(torch.zeros(())), want)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(blocks, backend="eager", fullgraph=True)(torch.zeros(())), want)
    attention_ops._FLEX_MASKS.clear()


@pytest.mark.parametrize("B,H,T,D,window", [(2, 3, 300, 32, 40), (1, 2, 257, 16, 128), (1, 1, 520, 64, 300),
                                            (2, 2, 64, 32, 1), (1, 1, 1000, 32, 256), (1, 1, 130, 16, 129)])
def test_flex_local_attention_forward_matches_the_masked_reference(B, H, T, D, window):
    torch.manual_seed(T + window)
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    want = local_attention_reference(q, k, v, window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (FlexAttention's note that it runs unfused without torch.compile)
        got = attention_ops.local_attention_flex(q.float(), k.float(), v.float(), window)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_local_heads_take_flex_where_asked_and_fall_back_to_the_chunks(monkeypatch):
    from mosa_attention import LocalAttention
    torch.manual_seed(3)
    layer = LocalAttention(48, 2, window=20, head_dim=16)
    x = torch.randn(2, 150, 48)
    with torch.no_grad():
        want = layer(x)  # CPU default: no FlexAttention
        calls = []
        real = attention_ops.local_attention_flex
        monkeypatch.setattr(attention_ops, "local_attention_flex", lambda *a: (calls.append(1), real(*a))[1])
        monkeypatch.setattr(attention_ops, "LOCAL_FLEX", True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = layer(x)
        assert calls
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

        # the automatic choice (None) falls back to the chunks, once and for good, with a warning
        def broken(*a):
            raise RuntimeError("no compiler here")
        monkeypatch.setattr(attention_ops, "local_attention_flex", broken)
        monkeypatch.setattr(attention_ops, "LOCAL_FLEX", None)
        monkeypatch.setattr(attention_ops, "_flex_available", lambda q: attention_ops.LOCAL_FLEX is not False)
        with pytest.warns(UserWarning, match="FlexAttention failed .*no compiler here"):
            got = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert attention_ops.LOCAL_FLEX is False
        # asked for explicitly (True), a failure is raised
        monkeypatch.setattr(attention_ops, "LOCAL_FLEX", True)
        with pytest.raises(RuntimeError, match="no compiler here"):
            layer(x)


def test_routing_and_generation_arguments_are_checked():
    # (a float or tensor k, 1-D scores and a string include_first used to pass or fail deep inside torch)
    from mosa_attention import MoSAConfig, MoSALM
    from mosa_attention.inference import generate
    from mosa_attention.ops import mosa, select_topk
    s = torch.rand(2, 3, 16)
    for k, match in ((2.5, "k=2.5"), (torch.tensor(2), "k=tensor"), (True, "k=True"), (17, "k=17")):
        with pytest.raises(ValueError, match=match):
            select_topk(s, k)
    with pytest.raises(ValueError, match="scores must be a floating tensor"):
        select_topk(s[0, 0], 2)
    with pytest.raises(ValueError, match="include_first='no'"):
        select_topk(s, 2, include_first="no")
    x = torch.randn(1, 16, 8)
    with pytest.raises(ValueError, match="include_first='no'"):
        mosa(x, torch.randn(2, 8), torch.randn(2, 8, 12), torch.randn(2, 4, 8), 4, rope_dims=2, include_first="no")
    model = MoSALM(MoSAConfig(vocab_size=20, n_layer=1, d_model=16, n_head=1, head_dim=16, seq_len=8,
                              attention="dense"))
    for kw, match in ((dict(eos_id=20), "eos_id=20"), (dict(eos_id="x"), "eos_id='x'"), (dict(stream=5), "stream=5")):
        with pytest.raises(ValueError, match=match):
            generate(model, [[1, 2]], 2, **kw)
