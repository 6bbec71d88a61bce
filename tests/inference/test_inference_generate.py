"""generate(): agreement with full forward passes, batching of ragged prompts, sampling and bad input."""
import warnings

import pytest
import torch

from mosa_attention import MoSAConfig, MoSALM
from mosa_attention.inference import RoutingWarning, calibrate_thresholds, generate, sample


def lm(**kw):
    base = dict(vocab_size=40, n_layer=2, d_model=32, n_head=3, head_dim=8, seq_len=16, sparsity=4,
                num_dense_heads=1, routing="threshold", max_seq_len=32)
    base.update(kw)
    torch.manual_seed(0)
    return MoSALM(MoSAConfig(**base)).eval()


def greedy_by_full_forward(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0][0, -1]
        seq.append(int(logits.argmax()))
    return seq


def test_greedy_matches_full_forward_with_ragged_prompts():
    model = lm(dense_kind="local")
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3, 5, 8]]
    out = model.generate(prompts, 8, temperature=0)
    assert out == [greedy_by_full_forward(model, p, 8) for p in prompts]


def test_tensor_in_tensor_out_and_seeded_sampling():
    model = lm()
    ids = torch.randint(0, 40, (2, 5))
    a = model.generate(ids, 6, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    b = model.generate(ids, 6, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    assert a.shape == (2, 11) and torch.equal(a, b) and torch.equal(a[:, :5], ids)


def test_ids_are_checked_once_not_at_every_step(monkeypatch):
    # generate checks its prompts once; the tokens it samples are valid by construction, so its decoding steps
    # skip extend's checks (on a GPU each check reads the ids' range back from the device)
    model = lm()
    calls = []
    check = model._check_ids
    monkeypatch.setattr(model, "_check_ids", lambda *a, **kw: (calls.append(a[0]), check(*a, **kw))[1])
    out = model.generate(torch.randint(0, 40, (2, 5)), 6, temperature=0)
    assert out.shape == (2, 11) and calls == ["ids"]


def test_stream_sees_every_column_and_eos_stops():
    model = lm()
    seen = []
    out = generate(model, [[1, 2, 3]], 10, temperature=0, stream=seen.append)
    assert [int(t[0]) for t in seen] == out[0][3:]
    eos = out[0][4]  # the second greedy token: generation must stop right there
    short = generate(model, [[1, 2, 3]], 10, temperature=0, eos_id=eos)
    assert short[0] == out[0][: out[0].index(eos, 3) + 1]


def test_sample_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert int(sample(logits, 1.0, top_k=1, generator=g)) == 1
    assert int(sample(logits, 1.0, top_p=0.01, generator=g)) == 1
    draws = {int(sample(logits, 1.0, top_k=2, generator=g)) for _ in range(50)}
    assert draws == {1, 3}


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_k=0), "top_k=0"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(max_new_tokens=-2), "max_new_tokens=-2"),
    (dict(seed="x"), "seed='x'"),
    (dict(capacity=0), "capacity=0"),
])
def test_invalid_sampling_parameters(kwargs, match):
    args = dict(max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(lm(), [[1, 2]], **args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1e-3), "temperature=-0.001"),
    (dict(top_k=0), "top_k=0"),
    (dict(top_p=0), "top_p=0"),
])
def test_sample_checks_its_arguments(kwargs, match):
    # (a negative temperature used to sample the inverted distribution silently)
    from mosa_attention.inference import sample
    with pytest.raises(ValueError, match=match):
        sample(torch.randn(2, 10), **kwargs)


def test_prompt_longer_than_supported():
    model = lm()
    with pytest.raises(ValueError, match="exceeds the longest sequence this model accepts \\(32"):
        model.generate([[1] * 30], 5)
    with pytest.raises(ValueError, match="longest"):
        model.generate(torch.ones(1, 33, dtype=torch.long), 1)


@pytest.mark.parametrize("ids,match", [
    ([[1, 2], []], "ids\\[1\\] is an empty prompt"),
    ([], "non-empty list"),
    ([[1, 40]], "outside \\[0, vocab_size=40\\)"),
    (torch.ones(1, 0, dtype=torch.long), "seq_len >= 1"),
])
def test_bad_prompts(ids, match):
    with pytest.raises(ValueError, match=match):
        lm().generate(ids, 2)


def test_topk_model_without_causal_training_warns():
    model = lm(routing="topk")
    with pytest.warns(RoutingWarning, match="calibrate"):
        model.generate([[1, 2]], 2)
    calibrate_thresholds(model, [torch.randint(0, 40, (2, 16))])
    models = [model] + [lm(**ready) for ready in (dict(routing="topk", router_aux_loss=0.1), dict(routing="threshold"),
                                                  dict(attention="dense"))]
    for ready in models:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RoutingWarning)
            ready.generate([[1, 2]], 2)


def test_unsupported_attention_kind():
    with pytest.raises(NotImplementedError, match="attention='routing'"):
        lm(attention="routing").generate([[1, 2]], 2)


def test_new_cache_checks_its_arguments():
    from mosa_attention.inference.decode import new_cache
    model = lm()
    for kw, match in ((dict(pad=torch.tensor([-2, 0])), "column counts >= 0"), (dict(pad=[0, 0]), "pad must be"),
                      (dict(pad=torch.zeros(2, dtype=torch.long), page_size=0), "page_size=0")):
        with pytest.raises(ValueError, match=match):
            new_cache(model, **kw)
