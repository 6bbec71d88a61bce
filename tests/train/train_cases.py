"""Shared parameters of the trainer tests (imported by name, as tests/ops/triton_env.py is)."""
from mosa_attention.models.config import ATTENTION_KINDS

# every attention kind, and the hybrid with local heads beside its MoSA heads
ATTENTION_CASES = [*ATTENTION_KINDS, "mosa+local"]


def attention_overrides(attention: str) -> list:
    """The model overrides of one of ``ATTENTION_CASES``."""
    if attention == "mosa+local":
        return ["model.attention=mosa", "model.dense_kind='local'"]
    return [f"model.attention={attention!r}"]
