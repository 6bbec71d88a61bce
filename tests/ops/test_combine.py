"""ops.combine: the sum at marked rows, its Triton kernel (under the interpreter in CI) and its reference."""
import pytest
from triton_env import DEVICE, DTYPES, require

import torch

from mosa_attention.ops import add_at_rows
from mosa_attention.ops.combine import add_at_rows_, add_at_rows_reference_

triton_combine = pytest.importorskip("mosa_attention.ops.triton_combine")
require(triton_combine._add_at_rows)


@pytest.mark.parametrize("shape", [(2, 37, 48), (1, 5, 1000), (3, 8, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference(shape, dtype):
    torch.manual_seed(0)
    dst = torch.randn(shape, device=DEVICE).to(dtype)
    src = torch.randn(shape, device=DEVICE).to(dtype)
    rows = torch.rand(shape[:-1], device=DEVICE) < 0.3
    rows[0, 0] = True
    want = add_at_rows_reference_(dst.clone(), src, rows)
    got = triton_combine.add_at_rows_triton(dst.clone(), src, rows)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # unmarked rows untouched, marked rows summed
    torch.testing.assert_close(got[~rows], dst[~rows], rtol=0, atol=0)
    torch.testing.assert_close(got[rows], (dst[rows].float() + src[rows].float()).to(dtype), rtol=0, atol=0)


def test_no_marked_rows_and_all_marked():
    dst, src = torch.randn(2, 9, 40, device=DEVICE), torch.randn(2, 9, 40, device=DEVICE)
    none = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    torch.testing.assert_close(add_at_rows_(dst.clone(), src, none), dst, rtol=0, atol=0)
    torch.testing.assert_close(add_at_rows_(dst.clone(), src, ~none), dst + src)


def test_autograd_sum_equals_plus_where_src_is_zero_off_the_rows():
    torch.manual_seed(1)
    rows = torch.rand(2, 11, device=DEVICE) < 0.5
    a = torch.randn(2, 11, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 11, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 11, 8, device=DEVICE, dtype=torch.float64)
    outs = []
    for masked in (True, False):
        dense = a @ w  # a linear output: its backward does not need it, so the sum may write into it
        sparse = b * rows[..., None]
        y = add_at_rows(dense, sparse, rows) if masked else dense + sparse
        outs.append((y.detach().clone(), *torch.autograd.grad((y * g).sum(), (a, b, w))))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y)


def test_narrower_src_into_wider_dst():
    # a float16 gradient added into a float32 one at the marked rows (the hybrid's x-gradient sum under
    # autocast): each src row converted, then added in float32
    torch.manual_seed(2)
    dst = torch.randn(2, 13, 40, device=DEVICE)
    src = torch.randn(2, 13, 40, device=DEVICE).half()
    rows = torch.rand(2, 13, device=DEVICE) < 0.4
    want = dst.clone()
    want[rows] += src[rows].float()
    torch.testing.assert_close(triton_combine.add_at_rows_triton(dst.clone(), src, rows), want, rtol=0, atol=0)
    torch.testing.assert_close(add_at_rows_reference_(dst.clone(), src, rows), want, rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (lambda d, s, r: (d, s[:, :-1], r), "dst and src must be floating tensors of one shape"),
    (lambda d, s, r: (d, s.int(), r), "dst and src must be floating tensors of one shape"),
    (lambda d, s, r: (d, s, r.int()), "rows must be a bool mask"),
    (lambda d, s, r: (d, s, r[:, :-1]), "rows must be a bool mask"),
])
def test_bad_input(bad, match):
    d, s, r = torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        add_at_rows_(*bad(d, s, r))


def test_add_at_rows_refuses_a_leaf_that_requires_grad():
    from mosa_attention.ops import add_at_rows
    d = torch.randn(2, 5, 4, requires_grad=True)
    with pytest.raises(ValueError, match="dst is a leaf that requires grad"):
        add_at_rows(d, torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("count", [1, 3, 5])
def test_cast_many_gives_each_tensor_cast_in_one_launch(count, monkeypatch):
    # sizes around the kernel's block (4096) and an empty tensor: every element of every tensor cast, none moved
    from mosa_attention.ops import triton_combine
    from mosa_attention.ops.combine import cast_many
    launches = []
    real = triton_combine._launch_casts
    monkeypatch.setattr(triton_combine, "_launch_casts", lambda *a: launches.append(a[3]) or real(*a))
    torch.manual_seed(count)
    shapes = [(3, 7), (4097,), (0, 5), (2, 4096), (1,)][:count]
    src = [torch.randn(s, device=DEVICE) * 1e3 for s in shapes]
    for dtype in (torch.float16, torch.bfloat16 if DEVICE != "cpu" else torch.float16):
        launches.clear()
        out = cast_many(src, dtype)
        assert len(launches) == 1 and launches[0] == sum(-(-t.numel() // 4096) for t in src)
        for o, t in zip(out, src):
            assert o.dtype == dtype and o.shape == t.shape and o.is_contiguous()
            assert torch.equal(o, t.to(dtype))
