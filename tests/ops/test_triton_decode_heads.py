"""The decoding step's MoSA-heads kernel against its plain-torch reference: output, the cache slots written for
the heads that keep the token, at awkward shapes (one head, one slot, full rooms, no RoPE, all RoPE dims, head
dims that are not powers of two, batch 1)."""
import pytest
import torch
import triton_env  # (the interpreter on machines without a GPU)

pytest.importorskip("triton")
from mosa_attention.ops.decode_heads import decode_heads, decode_heads_reference, resolve_decode_backend  # noqa: E402
from mosa_attention.ops.rope import rope_cos_sin  # noqa: E402
from mosa_attention.ops import triton_decode_heads  # noqa: E402

triton_env.require(triton_decode_heads._qkv_parts)
DEVICE = triton_env.DEVICE


def case(B, E, h, D, room, RD, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    x = r(B, h)
    w_qkv, w_o = r(E, h, 3 * D, scale=h ** -0.5), r(E, D, h, scale=D ** -0.5)
    scores = torch.rand(B, E, generator=g).to(DEVICE, dtype)
    keep = (torch.rand(B, E, generator=g) < 0.5).to(DEVICE)
    keep[0, 0] = True
    count = torch.randint(0, room, (B, E), generator=g).to(DEVICE)
    count[0, 0] = room - 1  # a full room: the new token takes its last slot
    if E > 1:
        count[0, 1] = 0  # an empty head: it attends to the new token alone
    pos = torch.randint(0, 4 * room, (B,), generator=g).to(DEVICE)
    cos, sin = rope_cos_sin(pos, RD, 10000.0, dtype)
    k_cache, v_cache = r(B, E, room, D), r(B, E, room, D)
    return x, scores, keep, count, w_qkv, w_o, cos.contiguous(), sin.contiguous(), k_cache, v_cache


SHAPES = [  # B, E, h, D, room, RD
    (1, 1, 32, 16, 1, 8),
    (2, 5, 64, 16, 9, 0),
    (3, 7, 48, 24, 33, 24),
    (1, 17, 128, 64, 40, 32),
    (2, 4, 96, 40, 70, 20),
    (1, 3, 32, 16, 34, 16),  # a full room of 34: 33 cached slots, one past a block of 32
    (1, 66, 320, 32, 5, 16),  # the split form: 5 slices of x's dims, 3 of the output's (the last one short),
]                             # and more heads than one block of the head sum


@pytest.mark.parametrize("form", triton_decode_heads.FORMS)
@pytest.mark.parametrize("dtype", triton_env.DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(shape, dtype, form, monkeypatch):
    monkeypatch.setattr(triton_decode_heads, "FORM", form)
    B, E, h, D, room, RD = shape
    args = case(B, E, h, D, room, RD, dtype, seed=sum(shape))
    ref_k, ref_v = args[8].clone(), args[9].clone()
    want = decode_heads_reference(*args[:8], ref_k, ref_v)
    got_k, got_v = args[8].clone(), args[9].clone()
    got = decode_heads(*args[:8], got_k, got_v, backend="triton")
    tol = triton_env.TOL[dtype] * 3
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    keep, count = args[2], args[3]
    slot = count.clamp(max=room - 1)
    for b in range(B):
        for e in range(E):
            if keep[b, e]:  # the kernel writes the slots of the heads that keep the token
                torch.testing.assert_close(got_k[b, e], ref_k[b, e], rtol=tol, atol=tol)
                torch.testing.assert_close(got_v[b, e], ref_v[b, e], rtol=tol, atol=tol)
            else:  # and leaves the others' caches alone
                others = torch.arange(room, device=slot.device) != slot[b, e]
                assert torch.equal(got_k[b, e][others], args[8][b, e][others])


def test_backend_is_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        decode_heads(*case(1, 1, 32, 16, 2, 8, torch.float32, 0), backend="cuda")


def test_auto_backend_takes_the_kernel_on_cuda_only():
    cpu = torch.zeros(1)
    assert resolve_decode_backend("auto", cpu) == "torch"
    assert resolve_decode_backend("triton", cpu) == "triton"  # (asked for: Triton's interpreter runs it here)
    if torch.cuda.is_available():
        assert resolve_decode_backend("auto", cpu.cuda()) == "triton"
    # "auto" on a CPU gives the reference's bits
    args = tuple(t.cpu() for t in case(2, 3, 32, 16, 2, 8, torch.float32, 0))
    k_auto, v_auto = args[8].clone(), args[9].clone()
    want = decode_heads(*args, backend="torch")
    got = decode_heads(*args[:8], k_auto, v_auto, backend="auto")
    assert torch.equal(got, want) and torch.equal(k_auto, args[8]) and torch.equal(v_auto, args[9])
