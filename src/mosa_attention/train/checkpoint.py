"""Checkpoints: one folder per save, complete or absent.

    <run>/checkpoints/step-000600/
        model.safetensors      the weights (and buffers), full, unsharded
        optimizer.safetensors  the optimizer's tensors, keyed state.<param name>.<name>
        tokenizer.json         the tokenizer the model was trained with
        state.json             step, configs, optimizer hyper-parameters, RNG states, data position,
                               and the size and SHA-256 of every file above

The folder is written under a temporary name and renamed when every file is on disk, so a crash or a full
disk never leaves a half-written checkpoint under a real name. Loading checks sizes and hashes before it
reads a tensor, and the model's parameter names and shapes before it copies one: a truncated file or a
checkpoint of another model is an error, never a partial load.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message says why and which file."""


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve(path) -> Path:
    """A checkpoint folder from itself or from its run folder (the latest checkpoint)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint at {path} (expected a run folder with checkpoints/step-*/ "
                              f"or a checkpoint folder with state.json)")
    return found[-1]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tensors(sd: dict) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory (tied embeddings, views)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], list]:
    """An optimizer state dict keyed by parameter names -> (tensors, JSON-able param groups)."""
    tensors = {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{name}.{key}"] = t
    return _tensors(tensors), osd["param_groups"]


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        name, _, field = key[len("state."):].rpartition(".")
        state.setdefault(name, {})[field] = value
    return {"state": state, "param_groups": groups}


def _encode_rng(states: list[torch.Tensor]) -> list[str]:
    return [base64.b64encode(s.numpy().tobytes()).decode() for s in states]


def _decode_rng(states: list[str]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in states]


def rng_state() -> dict:
    return {"torch": _encode_rng([torch.get_rng_state()]),
            "cuda": _encode_rng(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_decode_rng(state["torch"])[0])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = _decode_rng(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save(run_dir, step: int, model_sd: dict, optim_sd: dict | None, state: dict, tokenizer_json: str,
         keep_last: int = 2) -> Path:
    """Write a checkpoint of ``step`` atomically and delete all but the last ``keep_last``.

    ``state`` is the JSON-able rest (configs, RNG, data position); ``model_sd`` and ``optim_sd`` are full
    (unsharded) state dicts keyed by parameter names."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    files = {"model.safetensors": st_save(_tensors(model_sd)), "tokenizer.json": tokenizer_json.encode()}
    state = {"format_version": FORMAT_VERSION, "step": step, **state}
    if optim_sd is not None:
        tensors, groups = flatten_optimizer(optim_sd)
        files["optimizer.safetensors"] = st_save(tensors)
        state["optimizer_param_groups"] = groups
    state["files"] = {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in files.items()}
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, data in files.items():
            _write(tmp / name, data)
        _write(tmp / "state.json", json.dumps(state, indent=1).encode())
        if final.exists():  # saving the same step again (a re-run): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "no space left on device" if e.errno == errno.ENOSPC else str(e)
        raise CheckpointError(f"could not save the checkpoint of step {step} to {final}: {why}. "
                              f"Nothing was written; earlier checkpoints are intact.") from e
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


class Checkpoint:
    """A verified checkpoint: ``state`` (dict), ``model_state`` and ``optimizer_state`` (name-keyed)."""

    def __init__(self, path: Path, state: dict, model_state: dict, optimizer_state: dict | None, tokenizer_json: str):
        self.path, self.state, self.model_state = path, state, model_state
        self.optimizer_state, self.tokenizer_json = optimizer_state, tokenizer_json

    @property
    def step(self) -> int:
        return self.state["step"]


def load(path, with_optimizer: bool = True) -> Checkpoint:
    """Read and verify a checkpoint (folder or run folder). Raises CheckpointError on any damage."""
    path = resolve(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'state.json'} is missing or corrupt: {e}") from None
    if state.get("format_version") != FORMAT_VERSION or "files" not in state:
        raise CheckpointError(f"{path} has an unknown checkpoint format (format_version={state.get('format_version')})")
    blobs = {}
    for name, info in state["files"].items():
        if name == "optimizer.safetensors" and not with_optimizer:
            continue
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        data = f.read_bytes()
        if len(data) != info["bytes"]:
            raise CheckpointError(f"{f} is truncated or corrupt: {len(data)} bytes, expected {info['bytes']}")
        if _sha256(data) != info["sha256"]:
            raise CheckpointError(f"{f} is corrupt: its SHA-256 does not match the one recorded at save time")
        blobs[name] = data
    model_state = st_load(blobs["model.safetensors"])
    optim = None
    if with_optimizer and "optimizer.safetensors" in blobs:
        optim = unflatten_optimizer(st_load(blobs["optimizer.safetensors"]), state["optimizer_param_groups"])
    return Checkpoint(path, state, model_state, optim, blobs["tokenizer.json"].decode())


def check_fits(model_state: dict, expected: dict[str, torch.Size], where) -> None:
    """Raise unless ``model_state`` has exactly the names and shapes of ``expected``."""
    missing = sorted(set(expected) - set(model_state))
    unexpected = sorted(set(model_state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(model_state[k].shape)} vs model {tuple(expected[k])}"
             for k in expected if k in model_state and tuple(model_state[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        lines = ([f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"] if missing else []) + \
                ([f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"] if unexpected else []) + \
                ([f"shape {w}" for w in wrong[:5]])
        raise CheckpointError(f"checkpoint {where} does not fit this model: " + "; ".join(lines))


def config_diff(saved: dict, current: dict) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def load_model(path, device="cpu"):
    """(model in eval mode, tokenizer, checkpoint) from a run or checkpoint folder, for evaluation and
    generation."""
    from ..data.tokenizer import TextTokenizer  # noqa: PLC0415
    from ..models import MoSAConfig, MoSALM  # noqa: PLC0415
    from tokenizers import Tokenizer  # noqa: PLC0415

    ckpt = load(path, with_optimizer=False)
    model = MoSALM(MoSAConfig.from_dict(ckpt.state["model_config"]))
    check_fits(ckpt.model_state, {k: v.shape for k, v in model.state_dict().items()}, ckpt.path)
    model.load_state_dict(ckpt.model_state, strict=True)
    tokenizer = TextTokenizer(Tokenizer.from_str(ckpt.tokenizer_json))
    return model.to(device).eval(), tokenizer, ckpt
