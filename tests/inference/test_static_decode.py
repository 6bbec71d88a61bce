"""Fixed-shape decoding steps (``inference.static.StaticDecoder``) against the paged cache's ``extend``: the same
logits at every step, for every attention kind that generates, ragged prompts, and across the MoSA slots'
growth; on a GPU also replayed as CUDA graphs."""
import pytest
import torch

from mosa_attention.inference import extend, generate, new_cache
from mosa_attention.inference.static import StaticDecoder
from test_inference_decode import MODELS, model_of


def two_ways(model, seqs, prompt_lens, headroom, graphs=False, device="cpu", compile=False):
    """Prefill the left-padded prompts, then feed the remaining columns: (extend's logits, the static
    decoder's) per step, [steps][B, vocab] each."""
    L = max(prompt_lens)
    pad = torch.tensor([L - n for n in prompt_lens], device=device)
    batch = torch.stack([torch.cat([torch.zeros(L - n, dtype=torch.long), s[:n]])
                         for s, n in zip(seqs, prompt_lens)]).to(device)
    steps = min(len(s) - n for s, n in zip(seqs, prompt_lens))
    ref_cache, cache = new_cache(model, pad), new_cache(model, pad)
    extend(model, batch, ref_cache)
    extend(model, batch, cache)
    decoder = StaticDecoder(model, cache, max_len=L + steps, headroom=headroom, graphs=graphs, compile=compile)
    ref, got = [], []
    for t in range(steps):
        col = torch.stack([s[n + t] for s, n in zip(seqs, prompt_lens)]).to(device)
        ref.append(extend(model, col[:, None], ref_cache)[:, -1])
        got.append(decoder.step(col).clone())
    return ref, got, decoder, ref_cache


@pytest.mark.parametrize("kw", MODELS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
@pytest.mark.parametrize("headroom", [1, 64])
def test_static_steps_equal_extend(kw, headroom):
    # headroom 1: the MoSA slots fill up after a step or two and grow (twice or more) while decoding
    model = model_of(**kw)
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (30,)) for _ in range(3)]
    ref, got, decoder, ref_cache = two_ways(model, seqs, [5, 11, 1], headroom)
    assert len(ref) == 19
    for t, (r, g) in enumerate(zip(ref, got)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=f"step {t}")
    # the MoSA heads counted the same kept tokens as the paged cache
    for layer, ref_layer in zip(decoder.layers, ref_cache.layers):
        if layer["sparse"] is not None:
            assert torch.equal(layer["sparse"].count, ref_layer["sparse"].count)
    if headroom == 1 and any(layer["sparse"] is not None for layer in decoder.layers):
        assert decoder.room >= 4  # it grew


def test_static_decoder_refuses_what_it_cannot_hold():
    model = model_of(attention="mosa")
    pad = torch.tensor([0])
    cache = new_cache(model, pad)
    extend(model, torch.randint(0, 50, (1, 4)), cache)
    with pytest.raises(ValueError, match="max_len=4 leaves no column"):
        StaticDecoder(model, cache, max_len=4)
    decoder = StaticDecoder(model, cache, max_len=5)
    decoder.step(torch.tensor([3]))
    with pytest.raises(ValueError, match="built for max_len=5"):
        decoder.step(torch.tensor([3]))
    with pytest.raises(ValueError, match="headroom"):
        StaticDecoder(model, cache, max_len=8, headroom=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="graphs=True needs the cache on a CUDA device"):
            StaticDecoder(model, cache, max_len=8, graphs=True)
    capped = new_cache(model, pad, capacity=2)
    extend(model, torch.randint(0, 50, (1, 4)), capped)
    with pytest.raises(ValueError, match="capacity"):
        StaticDecoder(model, capped, max_len=8)


@pytest.mark.parametrize("kw", [dict(attention="mosa"), dict(attention="dense")])
def test_generate_takes_the_same_tokens_either_way(kw):
    model = model_of(**kw)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    a = generate(model, prompts, 12, temperature=0, fixed_shapes=False)
    b = generate(model, prompts, 12, temperature=0, fixed_shapes=True)
    assert a == b
    c, paged = generate(model, prompts, 12, temperature=0.8, top_k=10, seed=3, fixed_shapes=False, return_cache=True)
    d, fixed = generate(model, prompts, 12, temperature=0.8, top_k=10, seed=3, fixed_shapes=True, return_cache=True)
    assert c == d
    assert fixed.length == paged.length and fixed.entries() == paged.entries()  # (to_cache)


def test_generate_checks_compile():
    model = model_of(attention="mosa")
    with pytest.raises(ValueError, match="compile must be True or False"):
        generate(model, [[1, 2]], 2, compile="yes")
    with pytest.raises(ValueError, match="cannot go with fixed_shapes=False"):
        generate(model, [[1, 2]], 2, compile=True, fixed_shapes=False)


def test_compiled_steps_equal_extend():
    # the step's torch ops through torch.compile (the MoSA heads' op a graph break): extend's logits, a hybrid
    model = model_of(attention="mosa")
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (12,)) for _ in range(2)]
    ref, got, decoder, _ = two_ways(model, seqs, [5, 3], headroom=64, compile=True)
    assert decoder._step is not decoder._forward
    for t, (r, g) in enumerate(zip(ref, got)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4, msg=f"step {t}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kw", [dict(attention="mosa"), dict(attention="mosa", dense_kind="local"),
                                dict(attention="dense"), dict(attention="pure_mosa")],
                         ids=["mosa", "mosa-local", "dense", "pure_mosa"])
def test_compiled_cuda_graph_steps_equal_extend(kw):
    # compiled and replayed as CUDA graphs, with slots that grow (recorded, and compiled, again)
    model = model_of(**kw).cuda()
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (30,)) for _ in range(3)]
    ref, got, decoder, _ = two_ways(model, seqs, [5, 11, 1], headroom=2, graphs=True, device="cuda", compile=True)
    for t, (r, g) in enumerate(zip(ref, got)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4, msg=f"step {t}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kw", MODELS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_cuda_graph_steps_equal_extend(kw):
    # each step replayed as a CUDA graph (recorded again where the MoSA slots grow): extend's logits
    model = model_of(**kw).cuda()
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (40,)) for _ in range(3)]
    ref, got, decoder, _ = two_ways(model, seqs, [5, 11, 1], headroom=2, graphs=True, device="cuda")
    assert decoder.graph is not None
    for t, (r, g) in enumerate(zip(ref, got)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4, msg=f"step {t}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kw", [dict(attention="mosa"), dict(attention="mosa", dense_kind="local"),
                                dict(attention="dense")])
def test_generate_on_a_gpu_takes_cuda_graphs_by_default(kw, monkeypatch):
    import mosa_attention.inference.static as static

    model = model_of(**kw).cuda()
    recorded = []
    real = static.StaticDecoder._record
    monkeypatch.setattr(static.StaticDecoder, "_record", lambda self: recorded.append(1) or real(self))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    default, cache = generate(model, prompts, 20, temperature=0, return_cache=True)
    assert recorded, "the default did not record a CUDA graph"
    paged, paged_cache = generate(model, prompts, 20, temperature=0, fixed_shapes=False, return_cache=True)
    assert default == paged
    assert cache.length == paged_cache.length and cache.entries() == paged_cache.entries()


def test_steps_record_no_autograd_graph():
    # a model whose weights require gradients (as after training) decodes without building autograd graphs
    model = model_of(attention="mosa").requires_grad_(True)
    cache = new_cache(model, torch.tensor([0]))
    extend(model, torch.randint(0, 50, (1, 4)), cache)
    logits = StaticDecoder(model, cache, max_len=8).step(torch.tensor([3]))
    assert not logits.requires_grad


@pytest.mark.parametrize("kw", MODELS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_to_cache_holds_what_the_paged_steps_hold(kw):
    # the decoded state handed back as a paged cache: the same entries, positions, scores, keys and values as the
    # cache extend filled, and it extends on with the same logits
    model = model_of(**kw)
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (30,)) for _ in range(3)]
    _, _, decoder, ref_cache = two_ways(model, seqs, [5, 11, 1], headroom=1)
    cache = decoder.to_cache()
    assert cache.length == ref_cache.length and cache.entries() == ref_cache.entries()
    assert cache.held_bytes() == ref_cache.held_bytes()
    for layer, ref in zip(cache.layers, ref_cache.layers):
        if layer["sparse"] is not None:
            got, want = layer["sparse"].view(), ref["sparse"].view()
            valid, ref_valid = got[4], want[4]
            S = min(valid.shape[-1], ref_valid.shape[-1])
            assert torch.equal(valid[..., :S], ref_valid[..., :S]) and not valid[..., S:].any()
            for a, b in zip(got[:4], want[:4]):
                torch.testing.assert_close(a[:, :, :S][valid[..., :S]], b[:, :, :S][ref_valid[..., :S]])
    nxt = torch.tensor([7, 8, 9])
    torch.testing.assert_close(extend(model, nxt[:, None], cache), extend(model, nxt[:, None], ref_cache),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", MODELS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_triton_heads_step_equals_torch_heads_step(kw):
    # the MoSA heads' Triton step (only the heads that keep the token work; interpreted on a CPU) against the
    # plain-torch step, through whole decodes with slots that double
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model_of(**kw).to(device)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 50, (n,)) for n in (5, 11, 1)]
    L = 11
    pad = torch.tensor([L - len(p) for p in prompts], device=device)
    batch = torch.stack([torch.cat([torch.zeros(L - len(p), dtype=torch.long), p]) for p in prompts]).to(device)
    decoders = {}
    for backend in ("torch", "triton"):
        cache = new_cache(model, pad)
        extend(model, batch, cache)
        decoders[backend] = StaticDecoder(model, cache, max_len=L + 12, headroom=1, graphs=False, backend=backend)
    g = torch.Generator().manual_seed(2)
    for t in range(12):
        tokens = torch.randint(0, 50, (3,), generator=g).to(device)
        want = decoders["torch"].step(tokens).clone()
        got = decoders["triton"].step(tokens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {t}")
    with pytest.raises(ValueError, match="backend must be one of"):
        StaticDecoder(model, new_cache(model, pad), max_len=L + 1, backend="cuda")


def test_compiled_decoders_of_other_batch_sizes_in_one_process():
    # torch.compile marks a size dynamic once it has seen two of it in a process (as the trainer's steps did,
    # benchmarks/NOTES.md v31.2): decoders of batch 2, 3, then 2 again, whose MoSA slots grow, each still gives
    # extend's logits
    model = model_of(attention="mosa")
    torch.manual_seed(4)
    for batch in (2, 3, 2):
        seqs = [torch.randint(0, 50, (14,)) for _ in range(batch)]
        ref, got, decoder, _ = two_ways(model, seqs, [5, 3, 4][:batch], headroom=1, compile=True)
        assert decoder.room >= 4  # it grew, and compiled again
        for t, (r, g) in enumerate(zip(ref, got)):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4, msg=f"batch {batch}, step {t}")
