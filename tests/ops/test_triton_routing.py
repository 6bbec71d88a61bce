"""The fused top-k kernel against ``torch.topk`` + sort, on CPU through Triton's interpreter."""
import pytest
import torch
from triton_env import DEVICE, require

pytest.importorskip("triton")
from mosa_attention.ops import triton_routing  # noqa: E402
from mosa_attention.ops.routing import select_topk  # noqa: E402
from mosa_attention.ops.triton_routing import route_logits_triton, topk_positions_triton  # noqa: E402

require(triton_routing._topk_select)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("include_first", [False, True])
@pytest.mark.parametrize("B,E,T,k", [
    (2, 3, 100, 7),    # T off a power of two
    (1, 1, 2, 2),      # k = T = 2, batch 1
    (2, 2, 33, 2),     # k = 2
    (2, 2, 64, 64),    # k = T
    (1, 4, 1000, 250),
    (3, 2, 17, 1),     # k = 1
])
def test_matches_torch_topk(B, E, T, k, include_first, dtype):
    # logits of a linear router: a [B, T, E] product seen as [B, E, T] (non-contiguous rows)
    scores = torch.randn(B, T, E, dtype=torch.float64).to(dtype).transpose(1, 2).to(DEVICE)
    if dtype != torch.float32:  # distinct 16-bit values (consecutive bit patterns from 1.0), so top-k is unique
        one = 0x3F80 if dtype == torch.bfloat16 else 0x3C00
        bits = torch.stack([torch.randperm(T) for _ in range(B * E)]).view(B, E, T) + one
        scores = bits.to(torch.int16).view(dtype).to(DEVICE)
    got = topk_positions_triton(scores, k, include_first)
    _, want = select_topk(scores, k, include_first, backend="torch")
    assert got.dtype == torch.int64 and got.shape == (B, E, k)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("include_first", [False, True])
def test_ties_keep_the_earliest_positions(include_first, dtype):
    B, E, T, k = 2, 3, 50, 12
    scores = (torch.randint(-2, 2, (B, E, T)) * 0.37).to(dtype).to(DEVICE)  # many ties, negatives too
    got = topk_positions_triton(scores, k, include_first)
    assert (got.diff(dim=-1) > 0).all()  # ascending, no repeats
    kept = scores.gather(-1, got)
    if include_first:
        assert (got[..., 0] == 0).all()
        want = scores[..., 1:].topk(k - 1, dim=-1).values
        kept = kept[..., 1:]
    else:
        want = scores.topk(k, dim=-1).values
    # the same scores are kept as by torch.topk ...
    assert torch.equal(kept.sort(-1).values, want.sort(-1).values)
    # ... and among the tokens tied with the smallest kept score, the earliest ones
    for b in range(B):
        for e in range(E):
            low = kept[b, e].min()
            cand = torch.nonzero(scores[b, e] == low).flatten()
            cand = cand[cand > 0] if include_first else cand
            taken = got[b, e][scores[b, e, got[b, e]] == low]
            taken = taken[taken > 0] if include_first else taken
            assert torch.equal(taken, cand[: len(taken)])


@pytest.mark.parametrize("form", [("UNROLL_PASSES", True), ("TWO_LEVEL_SCANS", True), ("TWO_LEVEL_SCANS", False)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_form_of_the_kernel_gives_the_same_selection(dtype, ties, form, monkeypatch):
    # the forms of the kernel kept for timing (the counting passes unrolled; the compaction's scans in one or
    # two levels, which the default picks by shape) select the same positions as the default, with ties
    # across the k-th place (then ranked by position) and without
    B, E, T, k = 2, 3, 70, 9
    if ties:
        scores = (torch.randint(-3, 4, (B, T, E)) * 0.29).to(dtype)
    else:  # each row a permutation of 0..T-1: distinct and exact in every dtype
        scores = torch.stack([torch.randperm(T) for _ in range(B * E)]).view(B, E, T).transpose(1, 2).to(dtype)
    scores = scores.transpose(1, 2).to(DEVICE)
    default = topk_positions_triton(scores, k, include_first=True)
    monkeypatch.setattr(triton_routing, *form)
    assert torch.equal(topk_positions_triton(scores, k, include_first=True), default)
    _, want = select_topk(scores.double(), k, True, backend="torch")
    if not ties:
        assert torch.equal(default, want)
    kept, want_kept = scores.gather(-1, default), scores.gather(-1, want)
    assert torch.equal(kept.sort(-1).values, want_kept.sort(-1).values)


@pytest.mark.parametrize("two_level", [False, True])
def test_both_scan_forms_match_torch_topk_at_real_row_lengths(two_level, monkeypatch):
    # rows of 1024 keys, as the targets' layers have them, through both forms of the compaction
    monkeypatch.setattr(triton_routing, "TWO_LEVEL_SCANS", two_level)
    T, k = 1024, 16
    bits = torch.stack([torch.randperm(T) for _ in range(6)]).view(2, 3, T) + 0x3F80
    scores = bits.to(torch.int16).view(torch.bfloat16).to(DEVICE)
    for include_first in (False, True):
        got = topk_positions_triton(scores, k, include_first)
        _, want = select_topk(scores, k, include_first, backend="torch")
        assert torch.equal(got, want)


def test_negative_scores_and_extremes():
    s = torch.tensor([[[-3.0, 5.0, -0.5, 0.0, 1e30, -1e30, 2.0, -2.0]]], device=DEVICE)
    assert topk_positions_triton(s, 3).tolist() == [[[1, 4, 6]]]
    assert topk_positions_triton(s, 3, include_first=True).tolist() == [[[0, 1, 4]]]
    assert topk_positions_triton(-s, 2).tolist() == [[[0, 5]]]


def test_select_topk_triton_backend_and_gradient():
    B, E, T, k = 2, 3, 40, 9
    logits = torch.randn(B, E, T, device=DEVICE, requires_grad=True)
    scores_t, idx_t = select_topk(torch.sigmoid(logits), k, backend="triton")
    scores_r, idx_r = select_topk(torch.sigmoid(logits), k, backend="torch")
    assert torch.equal(idx_t, idx_r) and torch.equal(scores_t, scores_r)
    (g_t,) = torch.autograd.grad(scores_t.sum(), logits)
    (g_r,) = torch.autograd.grad(scores_r.sum(), logits)
    assert torch.equal(g_t, g_r) and g_t.abs().sum() > 0


def test_bad_input_is_rejected():
    s = torch.rand(1, 2, 10, device=DEVICE)
    with pytest.raises(ValueError, match="k=11"):
        topk_positions_triton(s, 11)
    with pytest.raises(ValueError, match="scores.shape"):
        topk_positions_triton(s[0], 3)
    with pytest.raises(ValueError, match="float64"):
        topk_positions_triton(s.double(), 3)
    with pytest.raises(ValueError, match="backend='fast'"):
        select_topk(s, 3, backend="fast")
    with pytest.raises(ValueError, match="T=20000"):
        topk_positions_triton(torch.rand(1, 1, 20000, device=DEVICE), 3)
    with pytest.raises(ValueError, match="kept_dtype=torch.int64"):
        route_logits_triton(torch.randn(1, 10, 2, device=DEVICE), 3, kept_dtype=torch.int64)


def test_long_rows_fall_back_to_torch():
    s = torch.rand(1, 2, triton_routing.MAX_T + 5, device=DEVICE)
    assert torch.equal(select_topk(s, 7, backend="triton")[1], select_topk(s, 7, backend="torch")[1])


def test_compiles_without_graph_break():
    s = torch.rand(2, 3, 30, device=DEVICE)
    fn = torch.compile(lambda t: select_topk(t, 5, backend="triton"), fullgraph=True, backend="aot_eager")
    kept, idx = fn(s)
    assert torch.equal(idx, select_topk(s, 5, backend="torch")[1])


@pytest.mark.parametrize("include_first", [False, True])
@pytest.mark.parametrize("B,T,E,k", [(2, 100, 3, 7), (1, 2, 1, 2), (2, 64, 10, 64), (3, 300, 17, 9)])
def test_route_logits_reads_router_output_and_writes_scores(B, T, E, k, include_first):
    from mosa_attention.ops.triton_routing import route_logits_triton
    logits = torch.randn(B, T, E, device=DEVICE)  # F.linear(x, w_router): [B, T, E], heads innermost
    idx, kept = route_logits_triton(logits, k, include_first)
    scores = torch.sigmoid(logits).transpose(1, 2)
    want_kept, want_idx = select_topk(scores, k, include_first, backend="torch")
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(kept, want_kept, rtol=1e-6, atol=1e-7)
    idx16, kept16 = route_logits_triton(logits, k, include_first, kept_dtype=torch.float16)
    assert kept16.dtype == torch.float16 and torch.equal(idx16, idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("include_first", [False, True])
def test_topk_with_ties_keeps_a_top_k_multiset(dtype, include_first):
    # ties at the k-th score: positions ascending and unique, and the kept scores the same multiset as
    # torch.topk's, in every dtype (16-bit keys search fewer bits)
    from mosa_attention.ops import triton_routing
    torch.manual_seed(3)
    for B, E, T, k in ((2, 3, 100, 7), (1, 2, 40, 40), (2, 4, 300, 1), (1, 1, 2, 2), (1, 3, 1000, 250)):
        s = torch.randn(B, E, T, device=DEVICE).to(dtype)
        if T > 9:
            s[0, 0, 5:9] = s[0, 0, 4]  # ties
        got = triton_routing.topk_positions_triton(s, k, include_first)
        assert k == 1 or bool((got.diff(dim=-1) > 0).all()), (B, E, T, k)
        ref = torch.topk(s.float(), k, dim=-1).values.sort(-1).values
        if not include_first:
            torch.testing.assert_close(s.float().gather(-1, got).sort(-1).values, ref, rtol=0, atol=0)
        else:
            assert bool((got[..., 0] == 0).all())
