"""`mosa generate` and `mosa routing-report` on a small run folder written with the training checkpoint format."""
import argparse
import json

import pytest
import torch

from mosa_attention import MoSAConfig, MoSALM

checkpoint = pytest.importorskip("mosa_attention.train.checkpoint")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from mosa_attention.data.tokenizer import train_bpe

    texts = [f"the cat {i} sat on the mat and the dog sat on the log {i * 7}" for i in range(200)]
    tok = train_bpe(texts, vocab_size=300)
    cfg = MoSAConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=3, head_dim=8, seq_len=16, sparsity=4,
                     num_dense_heads=1)
    torch.manual_seed(0)
    model = MoSALM(cfg)
    root = tmp_path_factory.mktemp("run")
    (root / "corpus").mkdir()
    for i in range(0, 200, 10):  # documents, for the report's data
        (root / "corpus" / f"{i}.txt").write_text("\n".join(texts[i:i + 10]))
    tok.save(root / "tokenizer.json")
    data = {"source": str(root / "corpus"), "tokenizer": str(root / "tokenizer.json"), "cache_dir": str(root / "cache"),
            "val_fraction": 0.2, "test_fraction": 0.1}
    checkpoint.save(root, 1, model.state_dict(), None, {"model_config": cfg.to_dict(), "train_config": {"data": data}},
                    tok.to_str())
    return root


def call(module, argv):
    p = argparse.ArgumentParser()
    module.configure_parser(p)
    return module.run(p.parse_args(argv))


def test_generate_streams_text(run_dir, capsys):
    from mosa_attention.inference import cli

    rc = call(cli, ["--checkpoint", str(run_dir), "--prompt", "the cat", "--max-new-tokens", "6", "--seed", "0",
                    "--no-stop-at-eos", "--stats", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith("the cat") and out.endswith("\n"), err
    assert "trained with top-k routing" in err  # the run was neither aux-trained nor calibrated
    assert "6 tokens" in err and "KV cache" in err


def test_generate_passes_the_decoding_path_on(run_dir, capsys, monkeypatch):
    # --fixed-shapes / --no-fixed-shapes reach generate (None: its default, fixed shapes on a GPU); the same text
    import importlib

    from mosa_attention.inference import cli

    gen = importlib.import_module("mosa_attention.inference.generate")  # (the package's name is the function)
    seen, real, texts = [], gen.generate, set()
    monkeypatch.setattr(gen, "generate", lambda *a, **k: seen.append((k["fixed_shapes"], k["compile"]))
                        or real(*a, **k))
    for flag in ([], ["--fixed-shapes"], ["--no-fixed-shapes"]):
        rc = call(cli, ["--checkpoint", str(run_dir), "--prompt", "the cat", "--max-new-tokens", "5",
                        "--temperature", "0", "--no-stop-at-eos", "--device", "cpu", *flag])
        assert rc == 0
        texts.add(capsys.readouterr().out)
    assert seen == [(None, False), (True, False), (False, False)] and len(texts) == 1
    # --compile with the paged steps is refused in one line
    rc = call(cli, ["--checkpoint", str(run_dir), "--prompt", "the cat", "--max-new-tokens", "5", "--device", "cpu",
                    "--compile", "--no-fixed-shapes"])
    err = capsys.readouterr().err
    assert rc == 2 and "compile=True compiles the fixed-shape steps" in err and "Traceback" not in err


def test_generate_batch_and_bad_arguments(run_dir, capsys):
    from mosa_attention.inference import cli

    rc = call(cli, ["--checkpoint", str(run_dir), "--prompt", "the", "--prompt", "a dog sat", "--max-new-tokens", "3",
                    "--temperature", "0", "--device", "cpu"])
    out, _ = capsys.readouterr()
    assert rc == 0 and out.count("--- ") == 2
    assert call(cli, ["--checkpoint", str(run_dir), "--prompt", "x", "--top-p", "2", "--device", "cpu"]) == 2
    assert "top_p=2.0" in capsys.readouterr().err
    assert call(cli, ["--checkpoint", str(run_dir), "--prompt", "the cat " * 40, "--device", "cpu"]) == 2
    assert "exceeds the longest sequence" in capsys.readouterr().err


def test_user_mistakes_are_one_line_errors_not_tracebacks(run_dir, tmp_path, capsys):
    from mosa_attention.cli import main

    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mosa generate: error: no checkpoint at") and "Traceback" not in err
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "x", "--device", "gpu"]) == 2
    assert "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got device='gpu'" in capsys.readouterr().err


def test_the_run_is_positional_as_in_eval_or_given_by_checkpoint(run_dir, tmp_path, capsys):
    from mosa_attention.cli import main

    argv = ["--prompt", "the", "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"]
    assert main(["generate", str(run_dir), *argv]) == 0
    positional = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(run_dir), *argv]) == 0
    assert capsys.readouterr().out == positional and positional.startswith("the")
    assert main(["generate", str(run_dir), "--checkpoint", str(run_dir), *argv]) == 0  # the same run twice
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--checkpoint", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert "give the run once" in err and f"--checkpoint={str(tmp_path)!r}" in err
    assert main(["generate", *argv]) == 2
    assert "no run given" in capsys.readouterr().err
    assert main(["routing-report", "--device", "cpu"]) == 2
    assert "mosa routing-report: error: no run given" in capsys.readouterr().err


def test_the_end_of_text_token_is_not_printed():
    import io

    import torch

    from mosa_attention.inference.cli import _Printer

    class Tok:
        def decode(self, ids):
            return "".join(chr(97 + i) for i in ids)
    out = io.StringIO()
    printer = _Printer(Tok(), out=out, eos_id=3)
    for t in (0, 1, 3):
        printer(torch.tensor([t]))
    printer.finish()
    assert out.getvalue() == "ab"


def test_generate_saves_the_calibrated_model_as_a_new_run(run_dir, tmp_path, capsys):
    from mosa_attention.inference import cli
    from mosa_attention.train.checkpoint import load_model

    state_before = (checkpoint.resolve(run_dir) / "state.json").read_bytes()
    out = tmp_path / "calibrated"
    rc = call(cli, ["--checkpoint", str(run_dir), "--prompt", "the", "--max-new-tokens", "2", "--calibrate", "4",
                    "--save-calibrated", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert (checkpoint.resolve(run_dir) / "state.json").read_bytes() == state_before  # the original is untouched
    original, _, ck0 = load_model(run_dir)
    saved, _, ck1 = load_model(out)
    assert not original.config.thresholds_calibrated and saved.config.thresholds_calibrated
    assert ck1.step == ck0.step and ck1.state["calibrated_from"] == str(ck0.path)
    thresholds = {k: v for k, v in saved.state_dict().items() if k.endswith("threshold")}
    assert thresholds and any(not torch.equal(v, original.state_dict()[k]) for k, v in thresholds.items())
    # the saved run generates without calibrating and without the routing warning
    capsys.readouterr()
    assert call(cli, ["--checkpoint", str(out), "--prompt", "the", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
    # never over an existing run, and only with --calibrate
    assert call(cli, ["--checkpoint", str(run_dir), "--prompt", "the", "--calibrate", "2",
                      "--save-calibrated", str(out), "--device", "cpu"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert call(cli, ["--checkpoint", str(run_dir), "--prompt", "the", "--save-calibrated", str(tmp_path / "x"),
                      "--device", "cpu"]) == 2
    assert "--calibrate" in capsys.readouterr().err


def test_generate_is_a_mosa_subcommand():
    from mosa_attention.cli import COMMANDS

    if "generate" not in COMMANDS:
        pytest.skip("`generate` is not registered in mosa_attention/cli.py yet")
    assert COMMANDS["generate"][0] == "mosa_attention.inference.cli"


def test_routing_report(run_dir, capsys):
    from mosa_attention.inference import report_cli

    rc = call(report_cli, [str(run_dir), "--windows", "4", "--calibrate", "4", "--split", "train",
                           "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["calibrated"] and len(report["layers"]) == 2
    assert report["ppl_topk"] > 1 and report["ppl_threshold"] > 1
