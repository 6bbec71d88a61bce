"""A pre-LN transformer language model whose attention is chosen by ``MoSAConfig.attention``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import DenseAttention, FixedSparseAttention, LocalAttention, MoSAAttention, RoutingAttention
from .config import MoSAConfig


def build_attention(cfg: MoSAConfig) -> nn.Module:
    """The attention module of one layer for ``cfg.attention``."""
    common = dict(head_dim=cfg.head_dim, rope_fraction=cfg.rope_fraction, rope_base=cfg.rope_base)
    kind = cfg.attention
    if kind == "dense":
        return DenseAttention(cfg.d_model, cfg.n_head, **common)
    if kind in ("mosa", "pure_mosa"):
        # the local window is fixed at k of the training length, so a KV cache can hold it whatever the length
        return MoSAAttention(cfg.d_model, cfg.sparse_heads, cfg.sparsity, num_dense_heads=cfg.dense_heads,
                             dense_kind=cfg.dense_kind, include_first=cfg.include_first, routing=cfg.routing,
                             local_window=cfg.k if cfg.dense_kind == "local" else None,
                             router_aux=cfg.router_aux_loss > 0, **common)
    if kind == "fixed":
        return FixedSparseAttention(cfg.d_model, cfg.sparse_heads, cfg.sparsity, **common)
    if kind == "routing":
        return RoutingAttention(cfg.d_model, cfg.sparse_heads, cfg.sparsity, seq_len=cfg.seq_len, **common)
    if kind == "local":
        return LocalAttention(cfg.d_model, cfg.sparse_heads, window=cfg.k, **common)
    raise ValueError(f"unknown attention kind {kind!r}")


def _capturing(t: torch.Tensor) -> bool:
    """True while torch.compile traces or a CUDA graph captures: no host reads then."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return compiling or (t.is_cuda and torch.cuda.is_current_stream_capturing())


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.proj = nn.Linear(4 * d_model, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: MoSAConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = build_attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, return_selection: bool = False):
        h = self.ln1(x)
        selection = None
        if return_selection and isinstance(self.attn, MoSAAttention):
            a, selection = self.attn(h, return_selection=True)
        else:
            a = self.attn(h)
        x = x + self.dropout(a)
        x = x + self.mlp(self.ln2(x))
        return x, selection


class MoSALM(nn.Module):
    """Token embedding, ``n_layer`` blocks, final LayerNorm, output layer. RoPE inside attention gives positions."""

    def __init__(self, config: MoSAConfig):
        super().__init__()
        if not isinstance(config, MoSAConfig):
            raise TypeError(f"config must be a MoSAConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, init_std) everywhere, output projections scaled by 1/sqrt(2 n_layer)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() < 2 and "router" not in name:
                continue  # LayerNorm weights and biases keep their defaults
            nn.init.normal_(p, 0.0, out_std if name.endswith(("W_O", "W_O.weight", "proj.weight")) else std)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, return_selections: bool = False,
                return_logits: bool = True):
        """ids [B, T] -> (logits [B, T, vocab], loss or None[, selections]).

        ``selections`` has one entry per layer: (scores, positions) of its MoSA heads, or None.
        ``return_logits=False`` (with ``targets``) returns None in the logits' place: what a training step wants
        under torch.compile, where logits returned from the compiled graph are kept in memory and, unused,
        still get a gradient of zeros that its backward graph reads (0.2 ms of a 9 ms step of the tiny
        preset on an H200 went to filling and copying those zeros).
        While training with ``config.router_aux_loss > 0`` the loss includes that weight times the mean
        auxiliary router loss of the MoSA layers.
        """
        self._check_ids("ids", ids)
        if not isinstance(return_logits, bool):
            raise TypeError(f"return_logits must be a bool, got {return_logits!r}")
        if not return_logits and targets is None:
            raise ValueError("return_logits=False needs targets (the loss is then all this returns), got targets=None")
        x = self.embed(ids)
        selections = []
        for block in self.blocks:
            x, sel = block(x, return_selection=return_selections)
            selections.append(sel)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            self._check_ids("targets", targets, allow_ignore=True)
            if targets.shape != ids.shape:
                raise ValueError(f"targets must have the shape of ids {tuple(ids.shape)}, got {tuple(targets.shape)}")
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1).long(),
                                   ignore_index=-100)
            if self.config.router_aux_loss > 0 and self.training and torch.is_grad_enabled():
                aux = [b.attn.aux_loss for b in self.blocks if getattr(b.attn, "aux_loss", None) is not None]
                if aux:
                    loss = loss + self.config.router_aux_loss * torch.stack(aux).mean()
                for b in self.blocks:
                    if getattr(b.attn, "aux_loss", None) is not None:
                        b.attn.aux_loss = None  # one forward's loss; never carried into the next
        if not return_logits:
            logits = None
        return (logits, loss, selections) if return_selections else (logits, loss)

    @torch.no_grad()
    def generate(self, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, **kwargs):
        """Sample ``max_new_tokens`` tokens after ``ids`` with a KV cache (MoSA heads cache only the tokens
        they keep, under causal threshold routing). ``ids``: a [B, T] tensor, or a list of token lists of
        different lengths. See ``mosa_attention.inference.generate`` for the other options."""
        from ..inference.generate import generate  # noqa: PLC0415 (the application imports the model)

        return generate(self, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        **kwargs)

    def _check_ids(self, name: str, ids, allow_ignore: bool = False) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor (int64 or int32), got "
                            f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"{name} must have shape [batch, seq_len] with seq_len >= 1, got {tuple(ids.shape)}")
        if ids.shape[1] > self.config.longest_input:
            raise ValueError(f"{name} has seq_len={ids.shape[1]}, above the longest this model accepts "
                             f"({self.config.longest_input}; set max_seq_len to allow more)")
        if name == "ids" and ids.numel() and not _capturing(ids):
            lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one read-back from the device
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"{name} must lie in [0, vocab_size={self.config.vocab_size}), got values in [{lo}, {hi}]")
