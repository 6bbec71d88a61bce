"""The MoSA language model and its configurations."""
from .config import ATTENTION_KINDS, PRESETS, MoSAConfig
from .lm import Block, MoSALM, build_attention

__all__ = ["ATTENTION_KINDS", "PRESETS", "Block", "MoSAConfig", "MoSALM", "build_attention"]
