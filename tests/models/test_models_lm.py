import pytest
import torch

from mosa_attention import MoSAConfig, MoSALM
from mosa_attention.models import ATTENTION_KINDS


def tiny(**kw):
    base = dict(vocab_size=50, n_layer=2, d_model=32, n_head=3, head_dim=8, seq_len=16, sparsity=4, num_dense_heads=1)
    base.update(kw)
    return MoSAConfig(**base)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_every_attention_kind_trains(kind):
    torch.manual_seed(0)
    model = MoSALM(tiny(attention=kind))
    ids = torch.randint(0, 50, (2, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        logits, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert logits.shape == (2, 15, 50)
    assert loss.item() < 0.5 * first


def test_flop_matched_heads_fit_the_budget():
    cfg = MoSAConfig.from_preset("tiny", attention="mosa", sparsity=64)
    assert cfg.sparse_heads == 505 and cfg.dense_heads == 4
    dense = MoSAConfig.from_preset("tiny", attention="dense")
    assert cfg.forward_flops() <= dense.forward_flops()
    assert cfg.replace(num_sparse_heads=506).forward_flops() > dense.forward_flops()


def test_model_is_causal_with_topk_leak_only_through_routing():
    torch.manual_seed(0)
    for kind in ("dense", "local", "fixed"):
        model = MoSALM(tiny(attention=kind)).eval()
        ids = torch.randint(0, 50, (1, 16))
        ids2 = ids.clone()
        ids2[0, 10:] = (ids2[0, 10:] + 1) % 50
        torch.testing.assert_close(model(ids)[0][:, :10], model(ids2)[0][:, :10])


def test_selections_are_returned():
    model = MoSALM(tiny(attention="mosa"))
    _, _, sels = model(torch.randint(0, 50, (2, 16)), return_selections=True)
    assert len(sels) == 2
    scores, idx = sels[0]
    E = model.config.sparse_heads
    assert idx.shape == (2, E, 4) and torch.all(idx[..., 1:] > idx[..., :-1])


def test_loss_without_logits_is_the_same_loss_and_gradient():
    # return_logits=False: what the trainer's step asks for (under torch.compile the logits would otherwise be an
    # output of the graph, kept alive and handed a gradient of zeros); same loss, same gradients
    torch.manual_seed(1)
    model = MoSALM(tiny(attention="mosa"))
    ids = torch.randint(0, 50, (2, 17))
    results = []
    for fn, keep in ((model, True), (model, False), (torch.compile(model, backend="aot_eager"), False)):
        logits, loss = fn(ids[:, :-1], ids[:, 1:], return_logits=keep)
        assert (logits is None) is not keep
        results.append((loss.detach(), *torch.autograd.grad(loss, list(model.parameters()))))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="return_logits=False needs targets"):
        model(ids, return_logits=False)
    with pytest.raises(TypeError, match="return_logits must be a bool"):
        model(ids[:, :-1], ids[:, 1:], return_logits="no")


@pytest.mark.parametrize("ids,match", [
    (torch.tensor([[1, 2, 50]]), "vocab_size=50"),
    (torch.tensor([[1, -1]]), "vocab_size"),
    (torch.ones(1, 4), "integer"),
    (torch.ones(1, 4, dtype=torch.int16), "int64 or int32"),
    (torch.ones(4, dtype=torch.long), "shape"),
    (torch.ones(1, 65, dtype=torch.long), "longest"),
])
def test_bad_ids(ids, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MoSALM(tiny(attention="dense"))(ids)


@pytest.mark.parametrize("kw,match", [
    (dict(attention="sparse"), "attention"),
    (dict(sparsity=0), "sparsity"),
    (dict(d_model=0), "d_model"),
    (dict(num_sparse_heads=0, attention="pure_mosa"), "no attention heads"),
    (dict(rope_base=0), "rope_base=0"),
    (dict(rope_fraction=-0.1), "rope_fraction=-0.1"),
    (dict(include_first="no"), "include_first='no'"),
    (dict(tie_embeddings=1), "tie_embeddings=1"),
    (dict(dropout=1.5), "dropout=1.5"),
    (dict(init_std=-1.0), "init_std=-1.0"),
    (dict(max_seq_len=20.5), "max_seq_len=20.5"),
    (dict(num_sparse_heads="3"), "num_sparse_heads='3'"),
    (dict(dense_kind="sliding"), "dense_kind='sliding'"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        MoSAConfig.from_preset("huge")


def test_config_round_trip():
    cfg = tiny(attention="routing")
    assert MoSAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MoSAConfig fields"):
        MoSAConfig.from_dict({**cfg.to_dict(), "n_heads": 3})
