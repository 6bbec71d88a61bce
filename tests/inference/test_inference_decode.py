"""Decoding with the KV cache against full forward passes: equal logits, causality, what the cache holds."""
import re

import pytest
import torch

from mosa_attention import MoSAConfig, MoSALM
from mosa_attention.inference import extend, new_cache, set_routing


def model_of(**kw):
    base = dict(vocab_size=50, n_layer=2, d_model=32, n_head=3, head_dim=8, seq_len=16, sparsity=4,
                num_dense_heads=1, routing="threshold")
    base.update(kw)
    torch.manual_seed(0)
    model = MoSALM(MoSAConfig(**base)).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if "router" in name:  # spread the scores so heads keep different numbers of tokens
            torch.nn.init.normal_(p, 0, 0.3)
    return model


def decode_all(model, sequences, prompt_lens, page_size=8):
    """Prefill each prompt (left-padded, one pass), then feed the rest token by token; logits per sequence."""
    L = max(prompt_lens)
    pad = torch.tensor([L - n for n in prompt_lens])
    cache = new_cache(model, pad, page_size=page_size)
    batch = torch.stack([torch.cat([torch.zeros(L - n, dtype=torch.long), s[:n]]) for s, n in zip(sequences, prompt_lens)])
    outs = [extend(model, batch, cache)]
    steps = min(len(s) - n for s, n in zip(sequences, prompt_lens))
    for t in range(steps):
        col = torch.stack([s[n + t] for s, n in zip(sequences, prompt_lens)])
        outs.append(extend(model, col[:, None], cache))
    logits = torch.cat(outs, 1)
    return [logits[b, int(pad[b]):] for b in range(len(sequences))], cache


MODELS = [
    dict(attention="mosa", dense_kind="dense"),
    dict(attention="mosa", dense_kind="local"),
    dict(attention="mosa", dense_kind="local", include_first=True, num_dense_heads=2),
    dict(attention="pure_mosa"),
    dict(attention="dense"),
    dict(attention="local"),
]


@pytest.mark.parametrize("kw", MODELS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_decoding_equals_full_forward(kw):
    model = model_of(**kw)
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (18,)) for _ in range(3)]
    prompt_lens = [5, 11, 1]  # ragged, one prompt of a single token
    got, _ = decode_all(model, seqs, prompt_lens)
    for s, n, g in zip(seqs, prompt_lens, got):
        ref = model(s[None, : n + g.shape[0] - n])[0][0]
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(attention="local"), dict(attention="mosa", dense_kind="local")],
                         ids=["local", "local-hybrid"])
def test_decoding_equals_a_full_forward_in_chunks(monkeypatch, kw):
    # the full forward's local heads in chunks (ops.local_attention, by default only above T = 4096): 50
    # tokens are four chunks of 16 for the window of 4
    from mosa_attention.ops import attention as attention_ops
    monkeypatch.setattr(attention_ops, "LOCAL_MASK_MAX_T", 0)
    model = model_of(**kw)
    torch.manual_seed(2)
    seqs = [torch.randint(0, 50, (50,)) for _ in range(3)]
    prompt_lens = [40, 37, 33]  # then 10 tokens one by one: 43 to 50 tokens, three or four chunks
    got, _ = decode_all(model, seqs, prompt_lens)
    for s, g in zip(seqs, got):
        assert g.shape[0] > 32
        torch.testing.assert_close(g, model(s[None, :g.shape[0]])[0][0], rtol=1e-5, atol=1e-5)


def test_prefill_in_one_pass_equals_token_by_token():
    model = model_of(attention="mosa", dense_kind="local")
    seq = torch.randint(0, 50, (2, 20))
    whole, _ = decode_all(model, list(seq), [20, 20])
    steps, _ = decode_all(model, list(seq), [1, 1], page_size=3)  # many pages per head
    for a, b in zip(whole, steps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", MODELS[:4], ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_causality_probe_threshold(kw):
    """Changing tokens after t never changes the outputs at positions <= t under threshold routing."""
    model = model_of(**kw)
    ids = torch.randint(0, 50, (2, 16))
    t = 7
    ids2 = ids.clone()
    ids2[:, t + 1:] = (ids2[:, t + 1:] + 1 + torch.randint(0, 48, ids2[:, t + 1:].shape)) % 50
    torch.testing.assert_close(model(ids)[0][:, : t + 1], model(ids2)[0][:, : t + 1], rtol=1e-5, atol=1e-6)


def test_causality_probe_shows_the_topk_leak():
    """The paper's top-k ranks a token against the whole sequence: changing the future changes which past
    tokens a head keeps, and so the outputs at earlier positions. This is why top-k cannot generate."""
    model = set_routing(model_of(attention="mosa"), "topk")
    ids = torch.randint(0, 50, (2, 16))
    t = 7
    ids2 = ids.clone()
    ids2[:, t + 1:] = (ids2[:, t + 1:] + 1 + torch.randint(0, 48, ids2[:, t + 1:].shape)) % 50
    before, after = model(ids)[0][:, : t + 1], model(ids2)[0][:, : t + 1]
    assert (before - after).abs().max() > 1e-3


def test_cache_holds_exactly_the_kept_tokens():
    model = model_of(attention="mosa", dense_kind="dense", num_dense_heads=1)
    seqs = [torch.randint(0, 50, (16,)) for _ in range(3)]
    prompt_lens = [4, 9, 2]
    _, cache = decode_all(model, seqs, prompt_lens)
    expected_entries = 0
    for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
        length = n + 16 - max(prompt_lens)
        _, _, sels = model(s[None, :length], return_selections=True)
        for layer, (scores, idx) in enumerate(sels):
            sp = cache.layers[layer]["sparse"]
            for e in range(idx.shape[1]):
                kept = idx[0, e][idx[0, e] < length].tolist()
                pos, score = sp.held(b, e)
                assert pos.tolist() == kept  # stored in order of arrival
                torch.testing.assert_close(score, scores[0, e, : len(kept)])
                expected_entries += len(kept)
    entries = cache.entries()
    assert entries["sparse"] == expected_entries
    dense_expected = sum(n + 16 - max(prompt_lens) for n in prompt_lens) * model.config.n_layer * 1
    assert entries["dense"] == dense_expected
    D, itemsize = model.config.head_dim, 4
    assert cache.held_bytes() == (expected_entries + dense_expected) * 2 * D * itemsize
    # the tensors: MoSA heads in pages of a pool, dense heads [B, H, C, D]; keys and values
    allocated = sum(2 * p.k.numel() * itemsize for p in cache.parts())
    assert cache.nbytes() == allocated >= cache.held_bytes()
    for layer in cache.layers:  # a head wastes less than one page; the pool has a little slack
        sp = layer["sparse"]
        assert sp.used == 1 + int(((sp.count + sp.page_size - 1) // sp.page_size).sum())
        assert sp.k.shape[0] <= sp.used + sp.used // 8 + 1


def test_local_heads_keep_a_ring_of_their_window():
    model = model_of(attention="mosa", dense_kind="local")
    _, cache = decode_all(model, [torch.randint(0, 50, (30,))], [3])
    ring = cache.layers[0]["dense"]
    assert ring.k.shape[2] == model.config.k
    assert sorted(ring.col.tolist()) == list(range(30 - model.config.k, 30))


def test_capacity_keeps_the_highest_scores():
    model = model_of(attention="pure_mosa")
    cap = 3
    seq = torch.randint(0, 50, (1, 20))
    cache = new_cache(model, torch.zeros(1, dtype=torch.long), capacity=cap)
    for t in range(20):
        extend(model, seq[:, t:t + 1], cache)
    # the scores of kept tokens depend on the layer input, itself changed by evictions below: check layer 0
    _, _, sels = model(seq, return_selections=True)
    scores, idx = sels[0]
    sp = cache.layers[0]["sparse"]
    assert int(sp.count.max()) <= cap and int(sp.pages.max()) <= -(-cap // sp.page_size) + 1
    for e in range(idx.shape[1]):
        kept = [(float(s), int(p)) for s, p in zip(scores[0, e], idx[0, e]) if p < 20]
        best = sorted(kept, reverse=True)[:cap]
        pos, score = sp.held(0, e)
        held = sorted(zip(score.tolist(), pos.tolist()), reverse=True)
        assert [p for _, p in held] == [p for _, p in best]


def test_sparse_cache_grows_like_t_over_sparsity():
    """With thresholds at the score median a head keeps about half its tokens; its cache follows, while a
    dense head's holds every token."""
    model = model_of(attention="mosa", sparsity=2)
    ids = torch.randint(0, 50, (4, 16))
    _, _, sels = model(ids, return_selections=True)
    cache = new_cache(model, torch.zeros(4, dtype=torch.long))
    extend(model, ids, cache)
    kept = sum(int((idx < 16).sum()) for _, idx in sels)
    assert cache.entries()["sparse"] == kept
    assert cache.entries()["dense"] == 4 * 16 * model.config.n_layer


def test_extend_rejects_bad_ids_before_touching_the_cache():
    model = model_of()
    cache = new_cache(model, torch.zeros(2, dtype=torch.long))
    V = model.config.vocab_size
    bad = [
        (torch.tensor([[1, V]]).expand(2, -1), f"vocab_size={V}"),  # one id past the vocabulary
        (torch.tensor([[-1, 0], [0, 0]]), "got values in [-1, 0]"),
        (torch.zeros(2, 3), "integer tensor"),
        (torch.zeros(2, dtype=torch.long), "shape [batch, seq_len]"),
        (torch.zeros(3, 2, dtype=torch.long), "batch size 3 but the cache was made for 2"),
    ]
    for ids, message in bad:
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            extend(model, ids, cache)
    assert cache.length == 0  # nothing was written
    logits = extend(model, torch.tensor([[1, V - 1], [0, 2]]), cache)
    assert logits.shape == (2, 2, V) and cache.length == 2
