"""``mosa train``: with no arguments, a toy MoSA hybrid on the built-in corpus, on the CPU, in minutes."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

# flag -> config key; every other key is reachable with --set section.key=value
FLAGS = {
    "preset": ("model.preset", str, "model size: toy (default), or the paper's tiny/small/medium/large"),
    "attention": ("model.attention", str, "dense, mosa (hybrid, default), pure_mosa, fixed, routing or local"),
    "sparsity": ("model.sparsity", float, "sparsity ρ: each sparse head keeps T/ρ tokens"),
    "seq_len": ("model.seq_len", int, "training sequence length T"),
    "data": ("data.source", str, "wiki (default), a folder/glob/file of text, hf:NAME[:CONFIG], or prepared data"),
    "tokenizer": ("data.tokenizer", str, "bpe (trained on the train split), gpt2, or a tokenizer.json"),
    "vocab_size": ("data.vocab_size", int, "BPE vocabulary size"),
    "cache_dir": ("data.cache_dir", str, "where prepared data is cached (default ~/.cache/mosa-attention)"),
    "steps": ("train.steps", int, "optimizer steps"),
    "batch_size": ("train.batch_size", int, "sequences per step, all processes together"),
    "grad_accum": ("train.grad_accum", int, "micro-batches per process and step"),
    "optimizer": ("train.optimizer", str, "adam or adamw"),
    "lr": ("train.lr", float, "peak learning rate"),
    "seed": ("train.seed", int, "seed of weights and batches"),
    "device": ("train.device", str, "auto, cpu, cuda, cuda:1, ..."),
    "dtype": ("train.dtype", str, "auto (bf16 autocast on CUDA), float32 or bfloat16"),
    "distributed": ("train.distributed", str, "under torchrun: ddp, fsdp or allreduce"),
    "grad_reduce_dtype": ("train.grad_reduce_dtype", str, "under torchrun: float32 or bfloat16 (half the bytes)"),
    "stop_after": ("train.stop_after", int, "stop after this many steps (checkpointed); --resume continues"),
    "out": ("train.out_dir", str, "run folder (default runs/<preset>-<attention>-<time>)"),
}


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Train a language model. With no arguments: a toy MoSA hybrid on the built-in Wikipedia "
                     "corpus, on the CPU in a few minutes. Settings come from the defaults, then --config, then "
                     "the flags below and --set; the full configuration is printed at start.")
    p.add_argument("--config", help="TOML/YAML/JSON file, or the name of a built-in one (see --list-configs)")
    p.add_argument("--list-configs", action="store_true", help="list the built-in example configs and exit")
    for name, (key, typ, help_text) in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, help=f"{help_text} [{key}]")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the model; MODE: default, reduce-overhead (CUDA graphs: the fastest on a GPU), "
                        "max-autotune, max-autotune-no-cudagraphs, auto (the default: reduce-overhead on a GPU, "
                        "eager elsewhere) or false (eager) [train.compile]")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="bit-repeatable steps: torch.use_deterministic_algorithms for the run [train.deterministic]")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any other setting, e.g. --set model.num_dense_heads=2 --set train.warmup_steps=100")
    p.add_argument("--resume", nargs="?", const="", metavar="RUN",
                   help="continue a run from its latest checkpoint (RUN: run or checkpoint folder; default --out)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--prepare-only", action="store_true",
                   help="prepare the data (split, tokenizer, token files), print its folder and exit; "
                        "copy that folder to another machine and pass it as --data there")


def builtin_configs() -> dict[str, Path]:
    root = Path(__file__).resolve().parent.parent / "configs"
    return {f.stem: f for f in sorted(root.glob("*.toml"))}


def overrides_from(args) -> list[str]:
    out = []
    for name, (key, typ, _) in FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}" if typ is str else f"{key}={value}")
    if getattr(args, "compile", None):
        mode = args.compile.lower()
        value = ("true" if mode == "default" else "false" if mode in ("false", "off", "eager")
                 else json.dumps(args.compile))
        out.append(f"train.compile={value}")
    if getattr(args, "deterministic", None):
        out.append("train.deterministic=true")
    return out + list(args.set)


def resolve_config(args):
    from .config import ConfigError, build_config  # noqa: PLC0415

    path = args.config
    if path and not Path(path).exists() and path in builtin_configs():
        path = builtin_configs()[path]
    elif path and not Path(path).exists():
        raise ConfigError(f"config {path!r} is neither a file nor a built-in config ({sorted(builtin_configs())})")
    resume = None
    if args.resume is not None:
        resume = args.resume or args.out
        if not resume:
            raise ConfigError("--resume needs the run folder: --resume RUN (or --out RUN)")
        run = Path(resume)
        run = run.parent.parent if (run / "state.json").is_file() else run
        if path is None and (run / "config.toml").is_file():
            path = run / "config.toml"
    return build_config(path, overrides_from(args)), resume


def _resolved_model_comment(cfg) -> str:
    """The model that [model] resolves to (the preset's values under the overrides), as TOML comments, so that
    the printed configuration stays a configuration file."""
    from .config import to_toml  # noqa: PLC0415

    m = cfg.model_config(cfg.data.vocab_size)
    derived = (f"{m.dense_heads} dense and {m.sparse_heads} sparse heads per layer, k = {m.k} of T = {m.seq_len} "
               f"tokens per sparse head" if m.attention != "dense" else f"{m.dense_heads} dense heads per layer")
    lines = ["# [model] resolves to (vocab_size: the tokenizer's, data.vocab_size until it is built):",
             f"# {derived}"]
    lines += [f"#   {ln}" if ln else "#" for ln in to_toml({"model": m.to_dict()}).splitlines()[1:]]
    return "\n".join(lines)


def run(args) -> int:
    from ..data.corpus import DataError  # noqa: PLC0415
    from .checkpoint import CheckpointError  # noqa: PLC0415
    from .config import ConfigError, to_toml  # noqa: PLC0415

    if args.list_configs:
        for name, f in builtin_configs().items():
            # the file's leading comment block, joined (its first line alone can stop mid-sentence)
            head = itertools.takewhile(lambda ln: ln.startswith("#"), f.read_text().splitlines())
            text = (ln.lstrip("#").strip() for ln in head)
            print(f"{name:20s} {' '.join(t for t in text if t)}")
        return 0
    try:
        cfg, resume = resolve_config(args)
        if args.print_config:
            print(to_toml(cfg.to_dict()))
            print(_resolved_model_comment(cfg))
            return 0
        if args.prepare_only:
            from ..data.prepare import prepare  # noqa: PLC0415

            data = prepare(cfg.data)
            print(data.summary())
            return 0
        from .loop import train  # noqa: PLC0415 (imports torch)

        train(cfg, resume=resume)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"mosa train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
