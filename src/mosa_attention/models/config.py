"""Configuration of the MoSA language model, with the paper's sizes as presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from ..flops import match_sparse_heads, model_flops
from ..ops._checks import check_bool
from ..ops.rope import check_rope_base, rope_dims_for
from ..ops.routing import check_sparsity, num_selected

ATTENTION_KINDS = ("dense", "mosa", "pure_mosa", "fixed", "routing", "local")

# The paper's model sizes (Table 1): layers, width, dense heads; head dim 64, T = 1024.
PRESETS = {
    "tiny": dict(n_layer=6, d_model=512, n_head=9),
    "small": dict(n_layer=9, d_model=1024, n_head=9),
    "medium": dict(n_layer=18, d_model=1024, n_head=9),
    "large": dict(n_layer=27, d_model=1280, n_head=16),
}

# attention kind -> the FLOP formula of its sparse heads
_SPARSE_HEAD_KIND = {"mosa": "mosa", "pure_mosa": "mosa", "fixed": "fixed", "routing": "routing", "local": "local"}


@dataclass
class MoSAConfig:
    """A MoSA language model. ``n_head`` is the dense model's head count, the FLOP budget that sparse
    attention kinds are matched to when ``num_sparse_heads`` is None."""

    vocab_size: int = 8192
    n_layer: int = 6
    d_model: int = 512
    n_head: int = 9
    head_dim: int = 64
    seq_len: int = 1024
    max_seq_len: int | None = None  # longest input accepted; None means 4 * seq_len
    attention: str = "mosa"
    sparsity: float = 32.0
    num_dense_heads: int = 4  # dense heads kept beside the MoSA heads of the "mosa" hybrid
    num_sparse_heads: int | None = None  # None: as many as the dense model's FLOPs allow
    dense_kind: str = "dense"  # the hybrid's other heads: "dense" or "local"
    include_first: bool = False
    routing: str = "topk"  # "topk" (the paper) or "threshold" (causal)
    router_aux_loss: float = 0.0  # weight of the auxiliary loss teaching scores to predict top-k (causal routing)
    thresholds_calibrated: bool = False  # set by inference.calibrate_thresholds: the threshold buffers fit data
    rope_fraction: float = 0.5
    rope_base: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "head_dim", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        for name in ("include_first", "thresholds_calibrated", "tie_embeddings"):
            check_bool(name, getattr(self, name))
        for name in ("max_seq_len", "num_sparse_heads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer or None, got {name}={value!r}")
        if isinstance(self.num_dense_heads, bool) or not isinstance(self.num_dense_heads, int):
            raise ValueError(f"num_dense_heads must be an integer, got num_dense_heads={self.num_dense_heads!r}")
        if self.dense_kind not in ("dense", "local"):
            raise ValueError(f"dense_kind must be 'dense' or 'local', got dense_kind={self.dense_kind!r}")
        rope_dims_for(self.head_dim, self.rope_fraction)  # (checks rope_fraction)
        self.rope_base = check_rope_base(self.rope_base)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got dropout={self.dropout!r}")
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) \
                or not 0 < self.init_std < float("inf"):
            raise ValueError(f"init_std must be a finite number > 0, got init_std={self.init_std!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got attention={self.attention!r}")
        self.sparsity = check_sparsity(self.sparsity)
        if self.attention == "mosa" and not 0 <= self.num_dense_heads <= self.n_head:
            raise ValueError(f"num_dense_heads must be in [0, n_head={self.n_head}], got {self.num_dense_heads}")
        if self.routing not in ("topk", "threshold"):
            raise ValueError(f"routing must be 'topk' or 'threshold', got routing={self.routing!r}")
        if isinstance(self.router_aux_loss, bool) or not isinstance(self.router_aux_loss, (int, float)) \
                or not 0 <= self.router_aux_loss < float("inf"):
            raise ValueError(f"router_aux_loss must be a finite number >= 0, got router_aux_loss={self.router_aux_loss!r}")
        if self.num_sparse_heads is not None and self.num_sparse_heads < 0:
            raise ValueError(f"num_sparse_heads must be >= 0 or None, got {self.num_sparse_heads}")
        if self.max_seq_len is not None and self.max_seq_len < self.seq_len:
            raise ValueError(f"max_seq_len must be >= seq_len={self.seq_len}, got max_seq_len={self.max_seq_len}")
        if self.attention != "dense" and self.sparse_heads + self.dense_heads == 0:
            raise ValueError(f"this configuration has no attention heads (attention={self.attention!r}, "
                             f"num_sparse_heads={self.num_sparse_heads}); raise n_head or lower sparsity")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MoSAConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "MoSAConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MoSAConfig fields: {unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "MoSAConfig":
        return replace(self, **changes)

    @property
    def causal_routing_ready(self) -> bool:
        """Whether threshold (causal) routing is expected to work: trained in it, trained with the auxiliary
        router loss, or thresholds calibrated on data. Models without MoSA heads are causal anyway."""
        return (self.attention not in ("mosa", "pure_mosa") or self.routing == "threshold"
                or self.router_aux_loss > 0 or self.thresholds_calibrated)

    @property
    def longest_input(self) -> int:
        return self.max_seq_len or 4 * self.seq_len

    @property
    def dense_heads(self) -> int:
        """Dense (or, for the hybrid with dense_kind='local', local) heads per layer."""
        return {"dense": self.n_head, "mosa": self.num_dense_heads}.get(self.attention, 0)

    @property
    def sparse_heads(self) -> int:
        """Heads of the sparse kind per layer: given, or FLOP-matched to ``n_head`` dense heads."""
        if self.attention == "dense":
            return 0
        if self.num_sparse_heads is not None:
            return self.num_sparse_heads
        return match_sparse_heads(_SPARSE_HEAD_KIND[self.attention], self.d_model, self.n_head, self.head_dim,
                                  self.seq_len, self.sparsity, self.dense_heads)

    @property
    def k(self) -> int:
        """Tokens each sparse head keeps at the training length."""
        return num_selected(self.seq_len, self.sparsity)

    def head_counts(self) -> dict[str, int]:
        """FLOP-formula kind -> heads per layer."""
        if self.attention == "dense":
            return {"dense": self.n_head}
        counts = {_SPARSE_HEAD_KIND[self.attention]: self.sparse_heads}
        if self.dense_heads:
            counts["local" if self.dense_kind == "local" else "dense"] = self.dense_heads
        return counts

    def forward_flops(self) -> float:
        """Forward FLOPs per sequence at the training length, by the paper's formulas."""
        return model_flops(self.n_layer, self.d_model, self.head_dim, self.seq_len, self.head_counts(), self.sparsity)

    def kv_cache_entries_per_layer(self) -> int:
        """Cached key/value pairs per layer for a full sequence: T per dense head, k per MoSA head."""
        c = self.head_counts()
        return self.seq_len * c.get("dense", 0) + self.k * (c.get("mosa", 0) + c.get("local", 0) + c.get("fixed", 0))
