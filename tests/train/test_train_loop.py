"""The training loop: overfitting one batch, resume equality, checkpoints, the schedule."""
import json
import math

import pytest
import torch

from mosa_attention import MoSAConfig, MoSALM
from mosa_attention.train import checkpoint as ckpt_io
from mosa_attention.train.config import OptimConfig, build_config
from mosa_attention.train.loop import train
from mosa_attention.train.optim import build_optimizer, lr_at
from train_cases import ATTENTION_CASES, attention_overrides


def losses(run_dir):
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("attention", ["mosa", "dense", "pure_mosa", "fixed", "routing", "local"])
def test_overfit_one_batch(attention):
    torch.manual_seed(0)
    cfg = MoSAConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, head_dim=16, seq_len=32, attention=attention,
                     sparsity=4, num_dense_heads=1)
    model = MoSALM(cfg)
    opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0))
    x = torch.randint(0, 64, (4, 33))
    first = None
    for _ in range(100):
        _, loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first, (attention, first, loss.item())


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_optimizer_is_fused_on_a_gpu_only(name):
    # torch's fused Adam / AdamW where every parameter is a plain CUDA tensor (one pass per step over each
    # parameter and its moments); the multi-tensor default elsewhere, so CPU runs keep their numbers
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(model, OptimConfig(optimizer=name))
    assert all(not g.get("fused") for g in opt.param_groups)
    if torch.cuda.is_available():
        ref = torch.nn.Linear(4, 3).cuda()
        fast = torch.nn.Linear(4, 3).cuda()
        fast.load_state_dict(ref.state_dict())
        opt = build_optimizer(fast, OptimConfig(optimizer=name))
        assert all(g.get("fused") for g in opt.param_groups)
        slow = build_optimizer(ref, OptimConfig(optimizer=name))
        for g in slow.param_groups:
            g["fused"] = None  # as on the CPU: torch's multi-tensor default
        for _ in range(3):
            x = torch.randn(8, 4, device="cuda")
            for m, o in ((ref, slow), (fast, opt)):
                o.zero_grad()
                m(x).square().sum().backward()
                o.step()
        for a, b in zip(ref.parameters(), fast.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_schedule_warmup_then_cosine_to_min_lr():
    c = OptimConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0) and lr_at(99, c) == pytest.approx(0.1)
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 99))


def test_train_writes_a_complete_run_folder(tiny_overrides, tmp_path):
    res = train(build_config(None, tiny_overrides), log=lambda *a: None)
    run = tmp_path / "run"
    assert res["step"] == 8 and res["val_ppl"] > 1
    for f in ("config.toml", "model_config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "final.json"):
        assert (run / f).is_file(), f
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step-000004", "step-000008"]
    ck = run / "checkpoints" / "step-000008"
    assert {p.name for p in ck.iterdir()} == {"model.safetensors", "optimizer.safetensors", "tokenizer.json", "state.json"}
    assert list(losses(run)) == list(range(1, 9))
    # the saved config reproduces the run
    again = build_config(run / "config.toml")
    assert again.to_dict() == build_config(None, tiny_overrides).to_dict()
    model, tok, c = ckpt_io.load_model(run)
    assert c.step == 8 and tok.vocab_size == 300 and model.config.d_model == 32


def test_resume_gives_the_uninterrupted_loss_curve_exactly(tiny_overrides, tmp_path):
    full = train(build_config(None, tiny_overrides + [f"train.out_dir={str(tmp_path / 'full')!r}"]), log=lambda *a: None)
    part = tiny_overrides + [f"train.out_dir={str(tmp_path / 'part')!r}"]
    stopped = train(build_config(None, part + ["train.stop_after=3"]), log=lambda *a: None)
    assert stopped["step"] == 3 and "val_ppl" not in stopped
    assert list(losses(tmp_path / "part")) == [1, 2, 3]
    resumed = train(build_config(None, part), resume=str(tmp_path / "part"), log=lambda *a: None)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # bit for bit, every step
    assert resumed["val_loss"] == full["val_loss"]
    a = ckpt_io.load(tmp_path / "full").model_state
    b = ckpt_io.load(tmp_path / "part").model_state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_a_middle_checkpoint_trims_later_metrics(tiny_overrides, tmp_path):
    train(build_config(None, tiny_overrides), log=lambda *a: None)
    run = tmp_path / "run"
    before = losses(run)
    said = []
    train(build_config(None, tiny_overrides), resume=str(run / "checkpoints" / "step-000004"), log=said.append)
    assert losses(run) == before
    assert any(line.startswith("warning: resuming from step 4") and "step-000008" in line for line in said), said


def test_resuming_a_finished_run_validates_again_without_a_second_line(tiny_overrides, tmp_path):
    first = train(build_config(None, tiny_overrides), log=lambda *a: None)
    run = tmp_path / "run"
    again = train(build_config(None, tiny_overrides), resume=str(run), log=lambda *a: None)
    vals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "val"]
    assert again["val_loss"] == first["val_loss"] and [r["step"] for r in vals] == [first["step"]]


def test_grad_accumulation_matches_one_big_batch(tiny_overrides, tmp_path):
    a = train(build_config(None, tiny_overrides + ["train.steps=3", f"train.out_dir={str(tmp_path / 'a')!r}"]),
              log=lambda *a: None)
    b = train(build_config(None, tiny_overrides + ["train.steps=3", "train.grad_accum=2",
                                                   f"train.out_dir={str(tmp_path / 'b')!r}"]), log=lambda *a: None)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys() and all(abs(la[k] - lb[k]) < 1e-5 for k in la)
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-4


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tiny_overrides, tmp_path, monkeypatch):
    import mosa_attention.train.loop as loop

    train(build_config(None, tiny_overrides + [f"train.out_dir={str(tmp_path / 'full')!r}"]), log=lambda *a: None)
    real = loop.train_batch

    def interrupted(tokens, seq_len, batch_size, seed, step, rows=slice(None)):
        if step == 5:
            raise KeyboardInterrupt
        return real(tokens, seq_len, batch_size, seed, step, rows)

    monkeypatch.setattr(loop, "train_batch", interrupted)
    cfg = build_config(None, tiny_overrides + ["train.save_every=0"])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda *a: None)
    run = tmp_path / "run"
    assert ckpt_io.resolve(run).name == "step-000005"
    monkeypatch.undo()
    train(cfg, resume=str(run), log=lambda *a: None)
    assert losses(run) == losses(tmp_path / "full")


def test_the_default_command_path_on_the_builtin_corpus(tmp_path, capsys):
    """`mosa train` as the README runs it, shortened: built-in corpus, toy model, progress bar, perplexity."""
    from mosa_attention.cli import main

    rc = main(["train", "--steps", "2", "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"),
               "--out", str(tmp_path / "run"), "--set", "data.max_documents=1500", "--set", "train.eval_windows=2"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "source = \"wiki\"" in out and "perplexity" in out and "2/2" in err  # config, result, progress bar
    assert (tmp_path / "run" / "loss.png").is_file()


def test_checkpoints_keep_the_last_n_and_round_trip_the_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    for step in (1, 2, 3, 4):
        ckpt_io.save(tmp_path, step, msd, osd, {"note": step}, "{}", keep_last=2)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    ck = ckpt_io.load(tmp_path)
    assert ck.step == 4 and ck.state["note"] == 4 and ck.tokenizer_json == "{}"
    assert torch.equal(ck.model_state["weight"], model.weight.detach())
    assert torch.equal(ck.optimizer_state["state"]["weight"]["exp_avg"], osd["state"]["weight"]["exp_avg"])
    assert ck.optimizer_state["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]


def test_deterministic_run_sets_torch_switch_and_restores_it(tiny_overrides, monkeypatch):
    import mosa_attention.train.loop as loop
    seen = []

    from torch._inductor import config as inductor_config

    def state():  # (and inductor's deterministic mode, which picks its kernels' configurations by rule)
        return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                getattr(inductor_config, "deterministic", True))

    monkeypatch.setattr(loop, "_train", lambda *a: seen.append(state()) or {})
    before = state()
    for value in ("true", "false"):
        loop.train(build_config(None, tiny_overrides + [f"train.deterministic={value}"]), log=lambda *a: None)
    # strict (not warn-only): on a GPU only that gives SDPA's deterministic backward
    assert seen == [(True, False, True), before] and state() == before


@pytest.mark.parametrize("attention", ATTENTION_CASES)
def test_every_attention_kind_trains_in_deterministic_mode(attention, tiny_overrides, tmp_path):
    # strict mode raises for an op that has no deterministic version: none of the models' ops may need one
    # (the GPU's kinds: tests/train/test_train_cuda.py)
    kind = attention_overrides(attention)
    out = train(build_config(None, tiny_overrides + kind + ["train.steps=2", "train.deterministic=true"]),
                log=lambda *a: None)
    assert out["step"] == 2 and math.isfinite(out["val_loss"])


def test_values_are_read_back_at_once_and_the_first_non_finite_loss_is_named():
    # the loop reads losses and gradient norms back only where it logs, evaluates or saves; the error must still
    # name the first step whose loss was not finite, not the step where it was read
    from mosa_attention.train.loop import _read_back

    pending = [(s, torch.tensor(v), torch.tensor(float(s))) for s, v in ((3, 2.5), (4, 1.5))]
    assert _read_back(pending) == (1.5, 4.0) and pending == []
    pending = [(s, torch.tensor(v), torch.tensor(1.0)) for s, v in ((5, 2.0), (6, float("nan")), (7, float("inf")))]
    with pytest.raises(FloatingPointError, match="nan at step 6"):
        _read_back(pending)


def test_a_diverging_run_stops_with_a_clear_error(tiny_overrides, tmp_path):
    cfg = build_config(None, tiny_overrides + ["train.steps=8", "train.log_every=8", "train.save_every=0",
                                               "train.lr=1e9", "train.warmup_steps=0", "train.grad_clip=0",
                                               f"train.out_dir={str(tmp_path / 'r')!r}"])
    with pytest.raises(FloatingPointError, match=r"the loss is (nan|inf) at step [1-8];"):
        train(cfg, log=lambda *a: None)


@pytest.mark.parametrize("asked", ["auto", "default"])
def test_a_compile_failure_under_auto_says_how_to_train_eagerly(asked, tiny_overrides, tmp_path, monkeypatch):
    # train.compile='auto' compiles on a GPU without being asked to: where compiling fails, the error says so and
    # names --compile false; a mode the user asked for fails with torch's own error. (A CPU run: 'auto' is made to
    # choose a mode as it would on a GPU, and torch.compile to hand back a model that fails.)
    from mosa_attention.train import loop

    def fails(*a, **k):
        raise AssertionError("inductor broke")

    monkeypatch.setattr(loop, "resolve_compile", lambda t, device: ("default" if t.compile == "auto" else t.compile,
                                                                     None))
    monkeypatch.setattr(loop.torch, "compile", lambda model, mode=None, dynamic=None: fails)
    cfg = build_config(None, tiny_overrides + [f"train.compile={asked}", f"train.out_dir={str(tmp_path / 'r')!r}"])
    if asked == "auto":
        with pytest.raises(RuntimeError, match="step 1 failed under torch.compile .*inductor broke.*--compile false"):
            train(cfg, log=lambda *a: None)
    else:
        with pytest.raises(AssertionError, match="inductor broke"):
            train(cfg, log=lambda *a: None)


def test_own_grads_moves_each_gradient_out_of_the_memory_it_was_handed_in():
    # under CUDA graphs the first micro-batch's gradients live in the graphs' pool; _own_grads puts clones in place
    from mosa_attention.train.loop import _own_grads

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model(torch.randn(5, 3)).sum().backward()
    model[1].bias.grad = None  # a parameter without a gradient keeps none
    before = {n: (p.grad.clone(), p.grad.data_ptr()) for n, p in model.named_parameters() if p.grad is not None}
    _own_grads(model)
    assert model[1].bias.grad is None
    for n, p in model.named_parameters():
        if n in before:
            assert p.grad.data_ptr() != before[n][1] and torch.equal(p.grad, before[n][0])


@pytest.mark.parametrize("asked", ["true", "false"])
def test_plain_compile_keeps_a_hybrids_heads_as_separate_ops(asked, tiny_overrides, tmp_path, monkeypatch):
    # without CUDA graphs a compiled step is bound by the host, where the hybrid op's own launches cost more than they
    # save (benchmarks/NOTES.md v30): a run under plain torch.compile turns layers.mosa.HYBRID_OP off while it trains
    # and hands the switch back as it was; an eager run leaves it alone (torch.compile: a stand-in that records it)
    from mosa_attention.layers import mosa as mosa_layer
    from mosa_attention.train import loop
    seen = []

    def compile_spy(model, mode=None, dynamic=None):
        seen.append((mosa_layer.HYBRID_OP, dynamic))
        return model

    monkeypatch.setattr(loop.torch, "compile", compile_spy)
    monkeypatch.setattr(mosa_layer, "HYBRID_OP", None)
    cfg = build_config(None, tiny_overrides + [f"train.compile={asked}", "train.steps=2",
                                               f"train.out_dir={str(tmp_path / 'r')!r}"])
    train(cfg, log=lambda *a: None)
    # (and static shapes: test_train_cuda.py's runs of two lengths in one process)
    assert seen == ([(False, False)] if asked == "true" else [])
    assert mosa_layer.HYBRID_OP is None
