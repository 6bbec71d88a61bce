"""The training configuration: three sections, ``[model]``, ``[data]`` and ``[train]``, from defaults, a
TOML (or YAML) file and command-line overrides, in that order.

``[model]`` is a preset name plus any ``MoSAConfig`` field to override (``vocab_size`` comes from the
tokenizer). Besides the paper's presets (tiny/small/medium/large) there is ``toy``: 4 layers of width 128,
T = 256, one dense head beside FLOP-matched MoSA heads at sparsity 8, which trains in minutes on a laptop
CPU and is what ``mosa train`` runs with no arguments, with a 4096-token BPE (the paper's presets get
the paper's 8192 unless ``data.vocab_size`` says otherwise).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..data.prepare import DataConfig
from ..models.config import ATTENTION_KINDS, PRESETS, MoSAConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The default model: small enough for a 2-core CPU (about 1.8M parameters, 0.6M outside the embeddings).
TOY = dict(n_layer=4, d_model=128, n_head=2, head_dim=64, seq_len=256, attention="mosa", sparsity=8.0,
           num_dense_heads=1)
TOY_VOCAB = 4096
MODEL_PRESETS = ("toy", *PRESETS)


# torch.compile's modes that ``train.compile`` may name
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# those that capture CUDA graphs (a step then marks its start: torch.compiler.cudagraph_mark_step_begin)
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
# how the processes of a torchrun run share their gradients (train.distributed; ``train.distributed.wrap``)
DIST_KINDS = ("ddp", "fsdp", "allreduce")
# the dtypes float32 gradients may travel in between processes (train.grad_reduce_dtype)
REDUCE_DTYPES = ("float32", "bfloat16")


@dataclass
class OptimConfig:
    """The ``[train]`` section: steps, batch, optimizer, schedule, precision, logging and checkpoints."""

    steps: int = 300
    batch_size: int = 16  # sequences per optimizer step, all processes and micro-batches together
    grad_accum: int = 1  # micro-batches per process and step (batch_size = world * grad_accum * micro-batch)
    optimizer: str = "adamw"  # "adam" or "adamw"
    lr: float = 2e-3
    min_lr: float = 2e-4  # the cosine decays from lr to min_lr at the last step
    warmup_steps: int = 30
    weight_decay: float = 0.1  # AdamW only; matrices only, not norms, routers or biases
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 0.25  # max global gradient norm, as the paper; 0 turns clipping off
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 autocast on CUDA, float32 on CPU; or "float32", "bfloat16"
    # torch.compile the model: false, true (inductor's default mode) or a mode of COMPILE_MODES; the modes
    # "reduce-overhead" and "max-autotune" replay each step as CUDA graphs (no per-launch host cost). "auto":
    # "reduce-overhead" on a GPU (eagerly a MoSA step is bound by the host), eager elsewhere (resolve_compile)
    compile: bool | str = "auto"
    deterministic: bool = False  # torch.use_deterministic_algorithms (strict) for the run: bit-repeatable GPU steps
    # under torchrun: "ddp", "fsdp" (FSDP2, fully_shard) or "allreduce" (the gradients averaged once per step,
    # after the backward: what the CUDA-graph modes of train.compile use, and choose by themselves over "ddp")
    distributed: str = "ddp"
    # the dtype float32 gradients travel in between processes: "float32", or "bfloat16" (half the bytes; each
    # process's gradient rounded to bf16 before the average, as DDP's bf16 compression hook does); not with FSDP
    grad_reduce_dtype: str = "float32"
    eval_every: int = 0  # validation every n steps (0: only at the end)
    eval_windows: int = 64  # validation windows of seq_len tokens (0: the whole split)
    eval_batch_size: int = 16
    log_every: int = 10  # metrics.jsonl line every n steps
    save_every: int = 100  # checkpoint every n steps (and always at the end)
    keep_last: int = 2  # checkpoints kept
    stop_after: int | None = None  # stop after this many steps in this invocation (checkpointed), resume later
    out_dir: str | None = None  # run folder; default runs/<attention>-<time>


@dataclass
class TrainConfig:
    model: dict = field(default_factory=lambda: {"preset": "toy"})
    data: DataConfig = field(default_factory=lambda: DataConfig(vocab_size=TOY_VOCAB))
    train: OptimConfig = field(default_factory=OptimConfig)

    def model_config(self, vocab_size: int) -> MoSAConfig:
        """The ``MoSAConfig`` of this run for a tokenizer of ``vocab_size`` tokens."""
        m = dict(self.model)
        preset = m.pop("preset", "toy")
        if "vocab_size" in m:
            raise ConfigError("model.vocab_size comes from the tokenizer; set data.vocab_size instead")
        if m.get("attention", "mosa") not in ATTENTION_KINDS:
            raise ConfigError(f"unknown attention kind {m['attention']!r}; choose one of {list(ATTENTION_KINDS)}")
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {list(MODEL_PRESETS)}")
        base = TOY if preset == "toy" else PRESETS[preset]
        try:
            return MoSAConfig.from_dict({**base, **m, "vocab_size": vocab_size})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[model]: {e}") from None

    def to_dict(self) -> dict:
        return {"model": dict(self.model), "data": asdict(self.data), "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = sorted(set(d) - {"model", "data", "train"})
        if unknown:
            raise ConfigError(f"unknown config sections {unknown}; the sections are [model], [data], [train]")
        cfg = cls()
        cfg.model = {"preset": "toy", **d.get("model", {})}
        data = dict(d.get("data", {}))
        if data.get("vocab_size") is None:  # the paper's 8192 for its presets; the toy is faster with 4096
            data["vocab_size"] = TOY_VOCAB if cfg.model["preset"] == "toy" else DataConfig.vocab_size
        cfg.data = _fill(DataConfig, asdict(cfg.data), data, "data")
        cfg.train = _fill(OptimConfig, asdict(cfg.train), d.get("train", {}), "train")
        return cfg

    def check(self) -> None:
        t = self.train
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "log_every", "keep_last"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.stop_after is not None and t.stop_after < 1:
            raise ConfigError(f"train.stop_after must be >= 1 (or unset), got {t.stop_after}")
        if t.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"train.optimizer must be 'adam' or 'adamw', got {t.optimizer!r}")
        if t.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"train.dtype must be 'auto', 'float32' or 'bfloat16', got {t.dtype!r}")
        if not (isinstance(t.compile, bool) or t.compile == "auto" or t.compile in COMPILE_MODES):
            raise ConfigError(f"train.compile must be true, false, 'auto' or one of {list(COMPILE_MODES)}, "
                              f"got {t.compile!r}")
        if t.distributed not in DIST_KINDS:
            raise ConfigError(f"train.distributed must be one of {list(DIST_KINDS)}, got {t.distributed!r}")
        if t.grad_reduce_dtype not in REDUCE_DTYPES:
            raise ConfigError(f"train.grad_reduce_dtype must be one of {list(REDUCE_DTYPES)}, "
                              f"got {t.grad_reduce_dtype!r}")
        if t.grad_reduce_dtype != "float32" and t.distributed == "fsdp":
            raise ConfigError(f"train.grad_reduce_dtype={t.grad_reduce_dtype!r} is for train.distributed='ddp' or "
                              f"'allreduce'; FSDP reduce-scatters its gradients in their own dtype")
        if not (math.isfinite(t.lr) and t.lr > 0 and 0 <= t.min_lr <= t.lr):
            raise ConfigError(f"need 0 < train.lr and 0 <= train.min_lr <= lr, got lr={t.lr}, min_lr={t.min_lr}")
        if t.warmup_steps < 0 or t.grad_clip < 0 or t.eval_every < 0 or t.save_every < 0 or t.eval_windows < 0:
            raise ConfigError("train.warmup_steps, grad_clip, eval_every, save_every and eval_windows must be >= 0")
        self.model_config(self.data.vocab_size)  # a bad [model] fails now, not after the data is prepared


class ConfigError(ValueError):
    """A configuration the user must fix; its message says which key and value."""


# a field's annotation (a string: ``from __future__ import annotations``) -> the Python types its values may have
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}


def _fits(value, annotation: str) -> bool:
    """Whether ``value`` has a type the annotation (e.g. "int", "float", "int | None", "bool | str") allows; a
    bool is not an int or a float here (TOML's true is no step count)."""
    for name in (part.strip() for part in annotation.split("|")):
        if name not in _TYPES:
            return True  # (an annotation this check does not know: left to the field's own checks)
        if isinstance(value, bool) and name != "bool":
            continue
        if isinstance(value, _TYPES[name]):
            return True
    return False


def _fill(cls, defaults: dict, given: dict, section: str):
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(f"unknown keys in [{section}]: {unknown}; known keys: {sorted(names)}")
    for key, value in given.items():
        annotation = names[key].type if isinstance(names[key].type, str) else getattr(names[key].type, "__name__", "")
        if not _fits(value, annotation):
            raise ConfigError(f"{section}.{key} must be of type {annotation}, got {section}.{key}={value!r}")
    return cls(**{**defaults, **given})


def read_file(path) -> dict:
    """A config file as a dict of sections: TOML, JSON, or YAML (needs PyYAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml  # noqa: PLC0415 (optional)
            except ImportError:
                raise ConfigError("YAML config files need PyYAML: pip install pyyaml") from None
            return yaml.safe_load(text) or {}
        if path.suffix == ".json":
            return json.loads(text)
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot parse {path}: {e}") from None


def parse_value(text: str):
    """A command-line value as TOML would read it (numbers, booleans, quoted strings), else a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a dict of sections."""
    d = {k: dict(v) for k, v in d.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in ("model", "data", "train"):
            raise ConfigError(f"an override is section.key=value with section model, data or train; got {item!r}")
        d.setdefault(section, {})[name] = None if value.strip().lower() in ("none", "null") else parse_value(value.strip())
    return d


def build_config(path=None, overrides: list[str] = ()) -> TrainConfig:
    base = read_file(path) if path is not None else {}
    for section, values in base.items():
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] in {path} must be a table of keys")
    cfg = TrainConfig.from_dict(apply_overrides(base, list(overrides)))
    cfg.check()
    return cfg


def to_toml(d: dict) -> str:
    """A dict of sections of scalars as TOML (None values are left out: they mean the default)."""
    lines = []
    for section, values in d.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if v is None:
                continue
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, (int, float)):
                lines.append(f"{k} = {v!r}")
            else:
                lines.append(f"{k} = {json.dumps(str(v))}")
        lines.append("")
    return "\n".join(lines)
