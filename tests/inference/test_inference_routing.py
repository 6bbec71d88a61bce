"""Causal routing: the auxiliary router loss, training in threshold mode, calibration, the report, and the
fixed local window."""
import pytest
import torch

from mosa_attention import MoSAAttention, MoSAConfig, MoSALM
from mosa_attention.inference import calibrate_thresholds, routing_mode, routing_report, set_routing
from mosa_attention.ops.routing import router_aux_loss, topk_membership


def lm(**kw):
    base = dict(vocab_size=40, n_layer=2, d_model=32, n_head=3, head_dim=8, seq_len=16, sparsity=4, num_dense_heads=1)
    base.update(kw)
    torch.manual_seed(0)
    return MoSALM(MoSAConfig(**base))


def test_aux_loss_is_added_while_training_only():
    ids = torch.randint(0, 40, (2, 16))
    plain, aux = lm(), lm(router_aux_loss=0.5)
    _, l0 = plain(ids, ids)
    _, l1 = aux(ids, ids)
    assert l1 > l0  # same weights (same seed), plus a positive BCE term
    aux.eval()
    torch.testing.assert_close(aux(ids, ids)[1], plain.eval()(ids, ids)[1])


def test_aux_loss_teaches_scores_to_predict_topk():
    torch.manual_seed(0)
    w = torch.randn(3, 16, requires_grad=True)
    x = torch.randn(4, 32, 16)
    opt = torch.optim.Adam([w], lr=0.1)
    first = None
    for _ in range(60):
        loss = router_aux_loss(torch.einsum("bth,eh->bet", x, w), 8)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = torch.sigmoid(torch.einsum("bth,eh->bet", x, w)).detach()
    agree = ((scores > 0.5) == topk_membership(scores, 8)).float().mean()
    assert loss.item() < 0.5 * first and agree > 0.9


def test_training_in_threshold_mode_reaches_the_router():
    model = lm(routing="threshold")
    ids = torch.randint(0, 40, (2, 16))
    model(ids, ids)[1].backward()
    for block in model.blocks:
        assert block.attn.router.grad.abs().sum() > 0


def test_calibration_keeps_k_of_t_tokens_per_head():
    model = lm(routing="topk")
    data = [torch.randint(0, 40, (4, 16)) for _ in range(2)]
    thresholds = calibrate_thresholds(model, data)
    assert model.config.thresholds_calibrated and len(thresholds) == 2
    assert all(b.attn.routing == "topk" for b in model.blocks)  # the rule in use is left as it was
    with routing_mode(model, "threshold"), torch.no_grad():
        _, _, sels = model(torch.cat(data), return_selections=True)
    for _, idx in sels:
        kept = (idx < 16).sum(-1).float().mean(0)  # per head, mean over sequences
        assert torch.allclose(kept, torch.full_like(kept, model.config.k), atol=1.0)


def test_routing_report():
    model = lm(routing="topk")
    data = [torch.randint(0, 40, (4, 17)) for _ in range(2)]
    calibrate_thresholds(model, [d[:, :-1] for d in data])
    report = routing_report(model, data)
    assert len(report["layers"]) == 2 and report["calibrated"]
    for row in report["layers"]:
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and 0.5 < row["kept_ratio"] < 1.5
    assert report["ppl_topk"] > 1 and report["ppl_threshold"] > 1


def test_set_routing():
    model = set_routing(lm(), "threshold")
    assert all(b.attn.routing == "threshold" for b in model.blocks)
    with pytest.raises(ValueError, match="routing='causal'"):
        set_routing(model, "causal")
    with pytest.raises(ValueError, match="routing='causal'"):
        lm(routing="causal")
    with pytest.raises(ValueError, match="router_aux_loss=-1"):
        lm(router_aux_loss=-1)


def test_local_window_is_fixed_by_the_model():
    layer = MoSAAttention(8, 2, 4, head_dim=4, num_dense_heads=1, dense_kind="local", local_window=3)
    assert layer.window(100) == 3
    assert MoSAAttention(8, 2, 4, head_dim=4, num_dense_heads=1, dense_kind="local").window(100) == 25
    model = lm(dense_kind="local")
    assert model.blocks[0].attn.local_window == model.config.k == 4
    # outputs at a position do not depend on the total length any more: a prefix gives the same outputs
    model = set_routing(model.eval(), "threshold")
    ids = torch.randint(0, 40, (1, 24))
    torch.testing.assert_close(model(ids[:, :10])[0], model(ids)[0][:, :10], rtol=1e-5, atol=1e-6)
