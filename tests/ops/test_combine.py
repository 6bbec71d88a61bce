"""ops.combine: the sum at marked rows and the linear product with that sum in its epilogue, their Triton
kernels (under the interpreter in CI) and their references."""
import pytest
from triton_env import DEVICE, require

import torch

import torch.nn.functional as F

from mosa_attention.ops import add_at_rows, linear_add_at_rows
from mosa_attention.ops.combine import (_linear_add_at_rows, add_at_rows_, add_at_rows_reference_,
                                        linear_add_at_rows_reference)

triton_combine = pytest.importorskip("mosa_attention.ops.triton_combine")
require(triton_combine._add_at_rows)


@pytest.mark.parametrize("shape", [(2, 37, 48), (1, 5, 1000), (3, 8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
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


def _linear_inputs(lead, K, N, dtype, kept=0.4, seed=0):
    torch.manual_seed(seed)
    a = torch.randn(*lead, K, device=DEVICE).to(dtype)
    w = (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype)
    src = torch.randn(*lead, N, device=DEVICE)
    rows = torch.rand(lead, device=DEVICE) < kept
    return a, w, src, rows


@pytest.mark.parametrize("lead, K, N", [((2, 37), 48, 40), ((1, 130), 256, 300), ((3, 5), 20, 17), ((1, 1), 16, 8),
                                        ((2, 129), 64, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_add_kernel_matches_reference(lead, K, N, dtype):
    # tiles cut M, N and K at uneven places (K = 20 or 48 is not a multiple of the 64-wide K step)
    a, w, src, rows = _linear_inputs(lead, K, N, dtype)
    want = linear_add_at_rows_reference(a.double(), w.double(), src.double(), rows)
    got = _linear_add_at_rows(a, w, src, rows)
    assert got.dtype == dtype and got.shape == want.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.double(), want, **tol)
    # the unmarked rows are the product alone: src's values there (nonzero here) are never read
    torch.testing.assert_close(got[~rows].double(), F.linear(a.double(), w.double())[~rows], **tol)


def test_linear_add_reads_strided_rows_and_no_or_every_row():
    a, w, src, rows = _linear_inputs((3, 11), 32, 24, torch.float32, seed=1)
    wide = torch.randn(3, 11, 80, device=DEVICE)
    wide[..., 8:40] = a  # a view whose rows are 80 apart
    strided = wide[..., 8:40]
    assert not strided.is_contiguous()
    torch.testing.assert_close(_linear_add_at_rows(strided, w, src, rows), linear_add_at_rows_reference(a, w, src, rows))
    none = torch.zeros_like(rows)
    torch.testing.assert_close(_linear_add_at_rows(a, w, src, none), F.linear(a, w))
    torch.testing.assert_close(_linear_add_at_rows(a, w, src, ~none), F.linear(a, w) + src)


def test_linear_add_gradients_equal_the_plain_sum():
    # src zero off the rows (as the MoSA heads' y): linear + sum, differentiated, equals F.linear(a, w) + src
    a, w, src, rows = _linear_inputs((2, 23), 40, 24, torch.float32, seed=2)
    src = src * rows[..., None]
    g = torch.randn(2, 23, 24, device=DEVICE)
    outs = []
    for fused in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (a, w, src)]
        y = linear_add_at_rows(*leaves, rows) if fused else F.linear(leaves[0], leaves[1]) + leaves[2]
        outs.append((y.detach(), *torch.autograd.grad((y * g).sum(), leaves)))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_add_under_autocast():
    # under autocast the product runs in the autocast dtype (as F.linear does), the weight's gradient comes
    # back in its own float32, and src (a float32 buffer) may be wider than the product
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    a, w, src, rows = _linear_inputs((2, 19), 32, 16, torch.float32, seed=3)
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        y = linear_add_at_rows(a.half(), w, src, rows)
    assert y.dtype == torch.float16
    want = linear_add_at_rows_reference(a.half().double(), w.half().double(), src.double(), rows)
    torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=2e-3)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, a.half().float().sum((0, 1)).expand(16, 32), rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("bad, match", [
    (lambda a, w, s, r: (a[..., :-1], w, s, r), "must agree on K"),
    (lambda a, w, s, r: (a, w, s[..., :-1], r), "src must be a floating tensor of shape"),
    (lambda a, w, s, r: (a, w, s.int(), r), "src must be a floating tensor of shape"),
    (lambda a, w, s, r: (a, w, s, r.int()), "rows must be a bool mask"),
])
def test_linear_add_bad_input(bad, match):
    a, w, s, r = torch.randn(2, 5, 8), torch.randn(4, 8), torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        linear_add_at_rows(*bad(a, w, s, r))
