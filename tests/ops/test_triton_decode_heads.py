"""The decoding step's MoSA-heads kernels against their plain-torch reference: output, which heads keep the token,
the counts and the cache slots written, at awkward shapes (one head, one slot, full rooms, no RoPE, all RoPE dims,
head dims that are not powers of two, batch 1, more heads than one block)."""
import pytest
import torch
import triton_env  # (the interpreter on machines without a GPU)

pytest.importorskip("triton")
from mosa_attention.ops.decode_heads import decode_heads, decode_heads_reference, resolve_decode_backend  # noqa: E402
from mosa_attention.ops.rope import rope_cos_sin  # noqa: E402
from mosa_attention.ops import triton_decode_heads  # noqa: E402

triton_env.require(triton_decode_heads._route)
DEVICE = triton_env.DEVICE


def case(B, E, h, D, room, RD, dtype, seed, include_first=False):
    """The op's arguments: thresholds half-way between router scores (no score near one, so that a rounding
    difference cannot flip a decision), a full room and an empty head, position 0 for the first sequence with
    ``include_first`` where B > 1 and a padded sequence (position -1) last where B > 2."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    x = r(B, h)
    w_router = r(E, h, scale=h ** -0.5)
    w_qkv, w_o = r(E, h, 3 * D, scale=h ** -0.5), r(E, D, h, scale=D ** -0.5)
    scores = torch.sigmoid(x.double().cpu() @ w_router.double().cpu().T)  # [B, E]
    threshold = torch.empty(E, dtype=torch.float64)
    for e in range(E):
        cuts = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), scores[:, e]]).sort().values
        gap = (e + seed) % (len(cuts) - 1)  # (over the heads: some keep every sequence's token, some none, ...)
        threshold[e] = (cuts[gap] + cuts[gap + 1]) / 2
    threshold = threshold.to(DEVICE, torch.float32)
    count = torch.randint(0, room, (B, E), generator=g).to(DEVICE)
    count[0, 0] = room - 1  # a full room: the new token takes its last slot
    if E > 1:
        count[0, 1] = 0  # an empty head: it attends to the new token alone
    pos = torch.randint(1, 4 * room + 1, (B,), generator=g).to(DEVICE)
    if include_first and B > 1:
        pos[0] = 0
    if B > 2:
        pos[-1] = -1
    cos, sin = rope_cos_sin(pos.clamp(min=0), RD, 10000.0, dtype)
    k_cache, v_cache = r(B, E, room, D), r(B, E, room, D)
    pos_cache = torch.randint(0, 4 * room, (B, E, room), generator=g).to(DEVICE)
    score_cache = torch.rand(B, E, room, generator=g).to(DEVICE)
    return [x, w_router, threshold, pos, count, w_qkv, w_o, cos.contiguous(), sin.contiguous(), k_cache, v_cache,
            pos_cache, score_cache]


def fresh(args):
    """A copy of the arguments the op writes (count and the caches)."""
    return [t.clone() if i in (4, 9, 10, 11, 12) else t for i, t in enumerate(args)]


SHAPES = [  # B, E, h, D, room, RD
    (1, 1, 32, 16, 1, 8),
    (2, 5, 64, 16, 9, 0),
    (3, 7, 48, 24, 33, 24),
    (1, 17, 128, 64, 40, 32),
    (2, 4, 96, 40, 70, 20),
    (1, 3, 32, 16, 34, 16),  # a full room of 34: 33 cached slots, one past a block of 32
    (1, 66, 320, 32, 5, 16),  # the split form: 5 slices of x's dims, 3 of the output's (the last one short),
]                             # and more heads than one block of the head sum


@pytest.mark.parametrize("compact", [True, False], ids=["list", "grid"])
@pytest.mark.parametrize("dtype", triton_env.DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_reference(shape, dtype, compact, monkeypatch):
    # both ways of finding the keeping heads' rows: a list made by the routing kernel, over fewer programs than
    # rows (so that a program takes several), or a program per row
    monkeypatch.setattr(triton_decode_heads, "COMPACT", compact)
    monkeypatch.setattr(triton_decode_heads, "PROGRAMS", 3)
    B, E, h, D, room, RD = shape
    include_first = sum(shape) % 2 == 0
    args = case(B, E, h, D, room, RD, dtype, seed=sum(shape), include_first=include_first)
    ref, got = fresh(args), fresh(args)
    want_y = decode_heads_reference(*ref, include_first=include_first)
    got_y = decode_heads(*got, include_first=include_first, backend="triton")
    tol = triton_env.TOL[dtype] * 3
    torch.testing.assert_close(got_y.float(), want_y.float(), rtol=tol, atol=tol)
    # the same heads keep the token (a mix of both, padding never, position 0 always with include_first)
    kept = ref[4] - args[4]
    assert torch.equal(got[4], ref[4])
    free = kept[int(include_first and B > 1): B - int(B > 2)]  # (the sequences whose scores decide)
    assert 0 < int(free.sum()) < free.numel() or free.numel() < 4
    if B > 2:
        assert int(kept[-1].sum()) == 0
    if include_first and B > 1:
        assert bool(kept[0].all())
    # every head's position and score at its slot
    torch.testing.assert_close(got[11], ref[11], rtol=0, atol=0)
    torch.testing.assert_close(got[12], ref[12], rtol=tol, atol=tol)
    slot = args[4].clamp(max=room - 1)
    for b in range(B):
        for e in range(E):
            if kept[b, e]:  # the kernels write the slots of the heads that keep the token
                torch.testing.assert_close(got[9][b, e], ref[9][b, e], rtol=tol, atol=tol)
                torch.testing.assert_close(got[10][b, e], ref[10][b, e], rtol=tol, atol=tol)
            else:  # and leave the others' keys and values alone
                assert torch.equal(got[9][b, e], args[9][b, e]) and torch.equal(got[10][b, e], args[10][b, e])
                assert int(slot[b, e]) < room


def test_backend_is_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        decode_heads(*case(1, 1, 32, 16, 2, 8, torch.float32, 0), backend="cuda")


@pytest.mark.parametrize("index, bad, match", [
    (0, lambda t: t[:, :-1], "w_qkv must be"),  # x narrower than the weights
    (1, lambda t: t[:-1], "w_router must have shape"),
    (2, lambda t: t[:, None], "threshold must have shape"),
    (4, lambda t: t.int(), "count must be torch.int64"),
    (6, lambda t: t.transpose(1, 2), "w_o must have shape"),
    (8, lambda t: t[:, :-1], "sin must have shape"),
    (9, lambda t: t[:, :, :-1], "v_cache must have shape"),
    (12, lambda t: t.double(), "score_cache must be torch.float32"),
    (10, lambda t: t.half(), "v_cache must have x's dtype"),
])
def test_bad_arguments_are_named(index, bad, match):
    args = case(2, 3, 32, 16, 4, 8, torch.float32, 0)
    args[index] = bad(args[index])
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=match):
            decode_heads(*args, backend=backend)


def test_strided_arguments_are_named_by_the_kernels():
    args = case(2, 3, 32, 16, 4, 8, torch.float32, 0)
    args[9] = args[9].transpose(2, 3).contiguous().transpose(2, 3)  # (the reference takes it as it is)
    with pytest.raises(ValueError, match="strided k_cache"):
        decode_heads(*args, backend="triton")


def test_auto_backend_takes_the_kernels_on_cuda_only():
    cpu = torch.zeros(1)
    assert resolve_decode_backend("auto", cpu) == "torch"
    assert resolve_decode_backend("triton", cpu) == "triton"  # (asked for: Triton's interpreter runs it here)
    if torch.cuda.is_available():
        assert resolve_decode_backend("auto", cpu.cuda()) == "triton"
    # "auto" on a CPU gives the reference's bits
    args = [t.cpu() for t in case(3, 3, 32, 16, 2, 8, torch.float32, 0)]
    want, got = fresh(args), fresh(args)
    want_y = decode_heads(*want, backend="torch")
    got_y = decode_heads(*got, backend="auto")
    assert torch.equal(got_y, want_y) and all(torch.equal(a, b) for a, b in zip(got, want))
