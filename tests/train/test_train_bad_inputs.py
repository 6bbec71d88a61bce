"""Bad input gets a clear message and leaves no half-written file."""
import errno
import shutil

import pytest
import torch

from mosa_attention.cli import main
from mosa_attention.data import DataConfig, prepare
from mosa_attention.train import checkpoint as ckpt_io
from mosa_attention.train.checkpoint import CheckpointError
from mosa_attention.train.config import ConfigError, build_config
from mosa_attention.train.loop import train


def quiet(*a, **k):
    pass


@pytest.mark.parametrize("args, message", [
    (["--preset", "gigantic"], "unknown preset 'gigantic'"),
    (["--attention", "linear"], "unknown attention kind 'linear'"),
    (["--sparsity", "0.5"], "sparsity must be a finite number >= 1"),
    (["--set", "model.n_layers=3"], "unknown MoSAConfig fields: ['n_layers']"),
    (["--set", "train.stepz=3"], "unknown keys in [train]"),
    (["--optimizer", "sgd"], "train.optimizer must be"),
    (["--config", "no-such-config"], "neither a file nor a built-in config"),
    (["--resume"], "--resume needs the run folder"),
    (["--set", "train.steps=abc"], "train.steps must be of type int, got train.steps='abc'"),
    (["--set", "train.lr=true"], "train.lr must be of type float, got train.lr=True"),
    (["--stop-after", "0"], "train.stop_after must be >= 1"),
    (["--device", "gpu"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got device='gpu'"),
])
def test_bad_settings_fail_before_any_work(args, message, capsys, tmp_path):
    out = [] if args == ["--resume"] else ["--out", str(tmp_path / "run")]
    assert main(["train", *out, *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resuming_a_missing_run_fails_before_the_data_is_prepared(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MOSA_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_missing_and_empty_data(capsys, tmp_path):
    assert main(["train", "--data", str(tmp_path / "missing"), "--cache-dir", str(tmp_path)]) == 2
    assert "data source not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("\n")
    assert main(["train", "--data", str(tmp_path / "empty"), "--cache-dir", str(tmp_path)]) == 2
    assert "holds no text" in capsys.readouterr().err


def test_corrupt_token_file_source(tiny_corpus, tmp_path, capsys):
    data = prepare(DataConfig(source=str(tiny_corpus), vocab_size=300, cache_dir=str(tmp_path / "c")), log=quiet)
    copy = tmp_path / "prepared"
    shutil.copytree(data.root, copy)
    raw = (copy / "train.bin").read_bytes()
    (copy / "train.bin").write_bytes(raw[: len(raw) // 2])
    assert main(["train", "--data", str(copy)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_sequence_longer_than_the_data(tiny_overrides, capsys):
    with pytest.raises(Exception, match="fewer than one window"):
        train(build_config(None, tiny_overrides + ["model.seq_len=100000"]), log=quiet)


def test_full_disk_while_saving_leaves_no_partial_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    cfg = build_config(None, tiny_overrides + ["train.stop_after=4"])
    train(cfg, log=quiet)  # a good checkpoint at step 4
    run = tmp_path / "run"
    real_open = open
    calls = []

    def full_disk_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode:
            calls.append(path)
            orig_write = f.write

            def write(data):
                orig_write(data[: len(data) // 2])  # part of it lands, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")

            f.write = write
        return f

    monkeypatch.setattr(ckpt_io, "open", full_disk_open, raising=False)
    with pytest.raises(CheckpointError, match="no space left on device.*Nothing was written"):
        train(build_config(None, tiny_overrides), resume=str(run), log=quiet)
    assert calls  # the save was really attempted
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000004"]  # no step-000008, no temporary folder
    ckpt_io.load(run)  # the earlier checkpoint is intact


def test_truncated_or_foreign_checkpoint_is_an_error_never_a_partial_load(tiny_overrides, tmp_path):
    train(build_config(None, tiny_overrides), log=quiet)
    run = tmp_path / "run"
    ck = ckpt_io.resolve(run)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(build_config(None, tiny_overrides), log=quiet)  # a fresh run must not mix with an old one
    # a checkpoint of another model
    with pytest.raises(CheckpointError, match="another model.*d_model"):
        train(build_config(None, tiny_overrides + ["model.d_model=48"]), resume=str(run), log=quiet)
    # a truncated weights file
    weights = ck / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt_io.load(run)
    # same size, flipped bytes
    weights.write_bytes(good[:-8] + b"\x00" * 8)
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt_io.load_model(run)
    weights.write_bytes(good)
    (ck / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt_io.load(run)


def test_state_dict_of_other_shapes_is_refused_before_copying():
    sd = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(CheckpointError, match=r"shape a: checkpoint \(2, 3\) vs model \(3, 3\)"):
        ckpt_io.check_fits(sd, {"a": torch.Size([3, 3]), "b": torch.Size([4])}, "x")
    with pytest.raises(CheckpointError, match="missing.*unexpected"):
        ckpt_io.check_fits(sd, {"a": torch.Size([2, 3]), "c": torch.Size([4])}, "x")


def test_config_errors_are_config_errors():
    with pytest.raises(ConfigError, match="vocab_size comes from the tokenizer"):
        build_config(None, ["model.vocab_size=100"])


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    # torchrun with more processes per machine than GPUs: each rank takes cuda:<local rank>; a rank without
    # a GPU is told so, not handed CUDA's "invalid device ordinal"
    from mosa_attention.train.distributed import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("auto", 0) == torch.device("cuda", 0)
    assert pick_device("cuda", 0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"local rank 1 takes cuda:1, but torch sees 1 CUDA device\(s\).*"
                                         r"--nproc-per-node 1.*train.device=cpu"):
        pick_device("auto", 1)
    with pytest.raises(ValueError, match=r"device 'cuda:2' was asked for, but torch sees 1 CUDA device"):
        pick_device("cuda:2")
    assert pick_device("cpu", 3) == torch.device("cpu")
