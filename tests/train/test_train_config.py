"""Configuration: defaults, files (TOML, JSON, YAML), overrides, built-in examples."""
import json

import pytest
import torch

from mosa_attention.train.cli import builtin_configs, configure_parser, overrides_from
from mosa_attention.train.config import ConfigError, build_config, parse_value, read_file, to_toml


def test_defaults_are_the_toy_run():
    cfg = build_config()
    m = cfg.model_config(cfg.data.vocab_size)
    assert (m.n_layer, m.d_model, m.seq_len, m.attention, m.sparsity) == (4, 128, 256, "mosa", 8.0)
    assert cfg.data.source == "wiki" and cfg.data.vocab_size == 4096 and cfg.train.grad_clip == 0.25
    assert m.head_counts() == {"mosa": 13, "dense": 1}  # FLOP-matched to 2 dense heads


def test_paper_presets_get_the_paper_vocabulary_and_flop_matched_heads():
    cfg = build_config(None, ['model.preset="tiny"', "model.sparsity=32"])
    m = cfg.model_config(cfg.data.vocab_size)
    assert cfg.data.vocab_size == 8192 and (m.n_layer, m.d_model) == (6, 512)
    assert m.head_counts()["dense"] == 4 and m.head_counts()["mosa"] > 9
    assert build_config(None, ['model.preset="tiny"', "data.vocab_size=1000"]).data.vocab_size == 1000


def test_file_then_flags_then_set(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\npreset = "small"\nattention = "fixed"\n[train]\nsteps = 7\nlr = 0.01\n')
    cfg = build_config(f, ["train.steps=9"])
    assert cfg.model == {"preset": "small", "attention": "fixed"} and cfg.train.steps == 9 and cfg.train.lr == 0.01
    # the written config reads back to the same configuration
    g = tmp_path / "again.toml"
    g.write_text(to_toml(cfg.to_dict()))
    assert build_config(g).to_dict() == cfg.to_dict()


def test_json_and_yaml_files(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"train": {"steps": 5}}))
    assert build_config(tmp_path / "c.json").train.steps == 5
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("model:\n  attention: dense\ntrain:\n  steps: 6\n")
    cfg = build_config(tmp_path / "c.yaml")
    assert cfg.train.steps == 6 and cfg.model["attention"] == "dense"


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_file(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[train\nsteps = ")
    with pytest.raises(ConfigError, match="cannot parse"):
        read_file(tmp_path / "bad.toml")
    (tmp_path / "sect.toml").write_text("[optim]\nlr = 1\n")
    with pytest.raises(ConfigError, match="unknown config sections"):
        build_config(tmp_path / "sect.toml")
    with pytest.raises(ConfigError, match="train.steps must be >= 1"):
        build_config(None, ["train.steps=0"])


def test_values_parse_like_toml():
    assert parse_value("3") == 3 and parse_value("1e-3") == 0.001 and parse_value("true") is True
    assert parse_value('"x y"') == "x y" and parse_value("plain/path") == "plain/path"


def test_flags_map_to_keys():
    import argparse

    p = argparse.ArgumentParser()
    configure_parser(p)
    args = p.parse_args(["--preset", "tiny", "--sparsity", "16", "--data", "some dir/x", "--compile", "--deterministic",
                         "--set", "train.lr=1"])
    o = overrides_from(args)
    assert 'model.preset="tiny"' in o and "model.sparsity=16.0" in o and 'data.source="some dir/x"' in o
    assert "train.compile=true" in o and "train.deterministic=true" in o and o[-1] == "train.lr=1"
    assert build_config(None, o).data.source == "some dir/x"


def test_compile_takes_a_mode():
    import argparse

    p = argparse.ArgumentParser()
    configure_parser(p)
    o = overrides_from(p.parse_args(["--compile", "reduce-overhead"]))
    assert o == ['train.compile="reduce-overhead"']
    assert build_config(None, o).train.compile == "reduce-overhead"
    assert build_config(None, ["train.compile=max-autotune"]).train.compile == "max-autotune"  # unquoted, as --set
    assert build_config(None, ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="train.compile must be .* got 'fast'"):
        build_config(None, ["train.compile=fast"])
    with pytest.raises(ConfigError, match="train.compile must be .* got (train.compile=)?1"):
        build_config(None, ["train.compile=1"])
    assert build_config(None, []).train.compile == "auto"  # the default
    for word in ("false", "off", "eager", "False"):
        o = overrides_from(p.parse_args(["--compile", word]))
        assert o == ["train.compile=false"] and build_config(None, o).train.compile is False
    assert build_config(None, overrides_from(p.parse_args(["--compile", "auto"]))).train.compile == "auto"


def test_compile_auto_takes_cuda_graphs_on_a_gpu_only(monkeypatch):
    # resolve_compile only reads the device's type and the settings: it runs without a GPU
    import importlib.util

    from mosa_attention.train.config import OptimConfig
    from mosa_attention.train.loop import resolve_compile

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_compile(OptimConfig(), cpu) == (False, None)
    mode, why = resolve_compile(OptimConfig(), cuda)
    if importlib.util.find_spec("triton") is not None:
        assert mode == "reduce-overhead" and "CUDA graphs" in why and "--compile false" in why
        # deterministic runs and gradient accumulation take the graphs too (they repeat and add up there)
        for t in (OptimConfig(deterministic=True), OptimConfig(grad_accum=2)):
            assert resolve_compile(t, cuda)[0] == "reduce-overhead"
    mode, why = resolve_compile(OptimConfig(distributed="fsdp"), cuda)
    assert mode is False and "fsdp" in why
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert resolve_compile(OptimConfig(), cuda) == (False, "train.compile='auto': eager (triton is not installed)")
    for given in (False, True, "default", "reduce-overhead", "max-autotune-no-cudagraphs"):  # asked for: kept
        assert resolve_compile(OptimConfig(compile=given), cuda) == (given, None)
        assert resolve_compile(OptimConfig(compile=given), cpu) == (given, None)


@pytest.mark.parametrize("name", sorted(builtin_configs()))
def test_builtin_configs_are_valid(name):
    cfg = build_config(builtin_configs()[name])
    cfg.model_config(cfg.data.vocab_size)


def test_prepare_only_prints_the_data_folder(tmp_path, capsys):
    from mosa_attention.cli import main

    (tmp_path / "t").mkdir()
    for i in range(12):
        (tmp_path / "t" / f"{i}.txt").write_text(f"document {i} " * 30)
    assert main(["train", "--data", str(tmp_path / "t"), "--vocab-size", "280", "--cache-dir", str(tmp_path / "c"),
                 "--prepare-only"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "c" / "data") in out and "tokens: train" in out
    assert not (tmp_path / "runs").exists()


def test_list_configs_prints_each_whole_description(capsys):
    from mosa_attention.cli import main
    assert main(["train", "--list-configs"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(builtin_configs())
    assert lines["tiny-mosa"].rstrip().endswith("For a GPU.")  # (the description's second comment line)


def test_print_config_stays_a_config_file_and_shows_the_resolved_model(tmp_path, capsys):
    import tomllib

    from mosa_attention.cli import main
    assert main(["train", "--config", "tiny-mosa", "--set", "model.sparsity=32", "--print-config"]) == 0
    out = capsys.readouterr().out
    f = tmp_path / "printed.toml"
    f.write_text(out)
    again = build_config(f)  # the comments do not change what the file configures
    assert again.to_dict() == build_config(builtin_configs()["tiny-mosa"]).to_dict() | {
        "model": {**again.model, "sparsity": 32}}
    resolved = tomllib.loads("\n".join(ln[4:] for ln in out.splitlines() if ln.startswith("#   ")))
    model = again.model_config(again.data.vocab_size)
    assert resolved == {k: v for k, v in model.to_dict().items() if v is not None}
    assert f"4 dense and {model.sparse_heads} sparse heads per layer, k = 32 of T = 1024" in out



def test_grad_reduce_dtype_is_checked():
    assert build_config(None, []).train.grad_reduce_dtype == "float32"
    assert build_config(None, ["train.grad_reduce_dtype=bfloat16"]).train.grad_reduce_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="train.grad_reduce_dtype must be one of .* got 'float16'"):
        build_config(None, ["train.grad_reduce_dtype=float16"])
    with pytest.raises(ConfigError, match="grad_reduce_dtype='bfloat16' is for .*FSDP"):
        build_config(None, ["train.grad_reduce_dtype=bfloat16", "train.distributed=fsdp"])
