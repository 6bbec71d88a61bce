"""The MoSA attention layer: MoSA heads, optionally beside dense or local heads (the paper's hybrid)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import add_at_rows, linear_sharing_input, num_selected, rope_dims_for, select_topk, sparse_attention
from ..ops import attention as attention_ops
from ..ops._host import side_stream
from ..ops.mosa import fused_topk_available, hybrid_fused, hybrid_fused_available, mosa_topk_fused
from ..ops.rope import check_rope_base
from ..ops.routing import check_sparsity, router_aux_loss, router_logits, select_threshold
from ._checks import check_bool, check_input, check_optional_bool, check_positive_int, exact_float
from .dense import DenseAttention

DENSE_KINDS = ("dense", "local")
ROUTINGS = ("topk", "threshold")

# A hybrid's MoSA heads and dense/local heads read the same x and do not depend on each other: on CUDA the
# MoSA heads run on a second stream, so their small kernels fill the gaps the dense heads leave (autograd
# runs each backward on its forward's stream, so the backward overlaps too). Not in distributed runs: the
# gradient hooks of DDP and FSDP work on their own streams, and that combination has not been verified on
# several GPUs. False: one stream everywhere.
PARALLEL_HEADS = True
# The MoSA heads of a hybrid may read x through the dense heads' QKV product (``ops.linear_sharing_input``), so
# that the dense heads' gradient of x is added into the MoSA heads' one in that product's epilogue instead
# of in autograd's own passes. True: always; False: never; None: where x is wider than the product's dtype
# (autocast over float32), where it saves the cast of the product's gradient and a float32 add (H200, t2
# 0.451 -> 0.435 ms). With x in the product's dtype it saved nothing (bf16 t2 0.349 / 0.350 ms: cuBLAS's
# epilogue that reads the other gradient took 31 against 21 us) and raised the peak by 7 MiB
# (benchmarks/NOTES.md, v8.1).
SHARED_INPUT_GRAD = None
# Which heads of a two-stream hybrid are launched first. The MoSA heads first (True, as measured) put their
# router GEMM ahead of the dense heads' QKV product, whose SMs it then holds for ~9 us at t2 on an H200
# (benchmarks/NOTES.md v8.3); False launches the dense heads first, which was slower (t2 bf16 0.349 -> 0.371
# ms, H200): the MoSA heads' forward chain then ends after the dense heads' (NOTES.md v9.0).
MOSA_HEADS_FIRST = True
# A hybrid on the fused MoSA op sums its two parts (y, and x's gradient) only at the tokens some MoSA head
# kept (``ops.add_at_rows``): the fused op's output and its share of x's gradient are zero elsewhere. True:
# always; False: never; None: where the expected kept fraction of the tokens, 1 - (1 - k/T)^E for E heads
# that keep k of T each, is at most ``MASKED_MAX_KEPT``. H200, bf16, graph: t2 (17 heads keep ~42 %)
# 0.349 -> 0.339 ms, under autocast 0.438 -> 0.432; t3 (505 heads keep all) 1.031 -> 1.071, so off there
# (benchmarks/NOTES.md v9.0).
MASKED_SUMS = None
MASKED_MAX_KEPT = 0.5
# With masked sums, the fused op writes its y and its share of x's gradient at the kept rows only
# (``rows_only``): its scatter buffers are cleared at those rows instead of everywhere (t2: two 16 MB clears
# become two 9 MB ones; H200, bf16, graph: 0.336 -> 0.328 ms, autocast 0.438 -> 0.420; benchmarks/NOTES.md
# v10.0). False: whole buffers (for comparison in benchmarks).
ROWS_ONLY = True
# Where a hybrid on the fused op reads x through the dense heads' product under autocast over wider x and
# without masked sums (t3), the op's kernels read the product's bf16 copy of x (``x_read``: the same values
# after their own cast, half the bytes, no cast for the router product); its gradient stays float32.
# False: they read x (for comparison in benchmarks).
X_READ = True
# Under torch.compile with autocast over wider x (a model's norm hands the layer float32), the fused op takes x
# already in the autocast dtype: the compiled graph folds that cast into the kernel that makes x (the norm),
# and the op's share of x's gradient comes back in that dtype (a buffer half as wide, 16-bit adds), widened where
# the compiled graph sums it with the rest of x's gradient. The dense heads keep the wide x, so their part of
# the gradient is widened before that sum as autocast does for any product. False: the op takes the wide x
# (it then reads a narrow copy and returns a wide gradient).
COMPILED_NARROW_INPUT = True
# Under torch.compile a hybrid of MoSA and dense heads on the fused op runs as one custom op each way, with its
# two parts on two streams and the masked sums inside (``ops.hybrid_fused``): the compiled graph itself has one
# stream, so the two parts ran one after the other (benchmarks/NOTES.md v29.2, v30). The op also adds the MoSA
# heads' rows into the dense heads' y after their W_O product, where its atomics add in place (v32: t2 on an H200,
# bf16 graphs, 0.339 -> 0.333 ms; t3 0.971 -> 0.952 with v32.4's one-pass sums). None: under torch.compile, and
# while a CUDA graph is being captured (where the host's time is not replayed: eagerly the op's extra host work is
# not worth it); True: also eagerly (tests, benchmarks); False: never (the parts as separate ops, for comparison).
HYBRID_OP = None
# Whether such captures take the op under autocast over wider x too. There the op takes x and the weights as they
# are, with their compute-dtype copies made in one launch, and makes their gradients in their own dtypes
# (``ops.triton_hybrid.WIDE_INPUT``): H200, bf16 autocast over float32, graphs, t2 0.394 -> 0.365 ms (0.640 -> 0.592x
# of the dense layer), t3 1.138 -> 1.110 (benchmarks/NOTES.md v33). False: the parts there (before v33; the op
# taking the caller's casts was no faster than the parts, t2 0.397 ms).
CAPTURED_WIDE = True


class MoSAAttention(nn.Module):
    """Mixture of Sparse Attention.

    Each of ``num_mosa_heads`` heads scores every token with r = sigmoid(x W_r), keeps the top
    k = min(max(T // sparsity, 2), T) tokens of each sequence, attends causally among them with RoPE at their
    original positions, scales each output by its score, projects it with its own W_O and adds it back at
    the token's position. ``num_dense_heads`` ordinary causal heads (``dense_kind="dense"``) or sliding-window
    heads (``dense_kind="local"``) are added beside them. The local window is ``local_window`` tokens; left
    None it is k at the current length, as in the paper, but a model fixes it (k at its training length) so
    that a KV cache can hold a fixed window.

    ``routing="threshold"`` replaces top-k by a per-head score threshold (the ``threshold`` buffer): a causal
    rule, so that generation token by token matches a full forward pass.

    ``router_aux=True``: while training, ``forward`` leaves in ``self.aux_loss`` the auxiliary router loss
    (BCE of the router logits against top-k membership; see ``ops.routing.router_aux_loss``), for the model
    to add to its loss. It teaches the score to cross 0.5 on about the top-k tokens in either routing mode.

    ``deterministic`` (Triton kernels): None follows ``torch.use_deterministic_algorithms``; True makes the
    scatter-adds bit-repeatable (slower), False uses atomics (see ``ops.sparse_attention``).

    On CUDA a hybrid runs its MoSA heads on a second stream beside the dense heads (``PARALLEL_HEADS``).
    """

    sparsity = exact_float("sparsity")
    rope_base = exact_float("rope_base")

    def __init__(self, d_model: int, num_mosa_heads: int, sparsity: float, head_dim: int = 64,
                 num_dense_heads: int = 0, dense_kind: str = "dense", include_first: bool = False,
                 rope_fraction: float = 0.5, rope_base: float = 10000.0, routing: str = "topk",
                 backend: str = "auto", local_window: int | None = None, router_aux: bool = False,
                 deterministic: bool | None = None):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_mosa_heads = check_positive_int("num_mosa_heads", num_mosa_heads, minimum=0)
        self.num_dense_heads = check_positive_int("num_dense_heads", num_dense_heads, minimum=0)
        if num_mosa_heads + num_dense_heads == 0:
            raise ValueError("MoSAAttention needs at least one head, got num_mosa_heads=0 and num_dense_heads=0")
        self.sparsity = check_sparsity(sparsity)
        self.head_dim = check_positive_int("head_dim", head_dim)
        if dense_kind not in DENSE_KINDS:
            raise ValueError(f"dense_kind must be one of {DENSE_KINDS}, got dense_kind={dense_kind!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got routing={routing!r}")
        self.dense_kind = dense_kind
        self.include_first = check_bool("include_first", include_first)
        self.rope_dims = rope_dims_for(head_dim, rope_fraction)
        self.rope_base = check_rope_base(rope_base)
        self.routing = routing
        self.backend = backend
        self.local_window = None if local_window is None else check_positive_int("local_window", local_window)
        self.router_aux = check_bool("router_aux", router_aux)
        self.deterministic = check_optional_bool("deterministic", deterministic)
        self.aux_loss = None
        E, D = num_mosa_heads, head_dim
        self.router = nn.Parameter(torch.empty(E, d_model))
        self.W_QKV = nn.Parameter(torch.empty(E, d_model, 3 * D))
        self.W_O = nn.Parameter(torch.empty(E, D, d_model))
        self.register_buffer("threshold", torch.full((E,), 0.5))
        self.dense = (DenseAttention(d_model, num_dense_heads, head_dim, rope_fraction, rope_base, backend=backend)
                      if num_dense_heads else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official release's initialisation."""
        h, E, D = self.d_model, self.num_mosa_heads, self.head_dim
        for w, fan in ((self.router, h), (self.W_QKV, 3 * D), (self.W_O, h * max(E, 1))):
            bound = 1.0 / math.sqrt(fan)
            nn.init.uniform_(w, -bound, bound)

    def num_selected(self, seq_len: int) -> int:
        return num_selected(seq_len, self.sparsity)

    def window(self, seq_len: int) -> int:
        """The local heads' window: ``local_window``, else k at ``seq_len``."""
        return self.local_window or self.num_selected(seq_len)

    def select(self, x: torch.Tensor):
        """(scores [B, E, k], positions [B, E, k] ascending) of the tokens each MoSA head keeps."""
        logits = router_logits(x, self.router)
        k = self.num_selected(x.shape[1])
        if self.router_aux and self.training and torch.is_grad_enabled():
            self.aux_loss = router_aux_loss(logits, k, self.include_first)
        scores = torch.sigmoid(logits)
        if self.routing == "threshold":
            return select_threshold(scores, self.threshold, self.include_first)
        return select_topk(scores, k, self.include_first, backend=self.backend)

    def _fused(self, x: torch.Tensor) -> bool:
        """Routing fused into the Triton op (its backward makes the router's gradients): top-k routing, no
        auxiliary loss to compute, triton backend."""
        aux = self.router_aux and self.training and torch.is_grad_enabled()
        return self.routing == "topk" and not aux and fused_topk_available(x, self.backend)

    def _compiled_input(self, x: torch.Tensor) -> torch.Tensor:
        """x in the autocast dtype for the fused op under torch.compile (``COMPILED_NARROW_INPUT``), else x."""
        dev = x.device.type
        if not (COMPILED_NARROW_INPUT and torch.compiler.is_compiling() and torch.is_autocast_enabled(dev)
                and x.element_size() > torch.get_autocast_dtype(dev).itemsize and self._fused(x)):
            return x
        return x.to(torch.get_autocast_dtype(dev))

    def _mosa_heads(self, x: torch.Tensor, rows: torch.Tensor | None = None, x_read: torch.Tensor | None = None,
                    beside: bool = False):
        """(y of the MoSA heads, selection); the kept tokens marked in ``rows`` (only given on the fused
        path, see ``_kept_rows``), whose sums then read those rows only (``ROWS_ONLY``); ``x_read``: x in
        the autocast dtype for the fused op's kernels to read (see ``_share_input``); ``beside``: the dense
        heads run beside them on another stream (the Triton kernels then take the forms that share the GPU)."""
        if self._fused(x):
            return mosa_topk_fused(x, self.router, self.W_QKV, self.W_O, self.num_selected(x.shape[1]),
                                   include_first=self.include_first, rope_dims=self.rope_dims,
                                   rope_base=self.rope_base, deterministic=self.deterministic, mark_rows=rows,
                                   rows_only=rows is not None and ROWS_ONLY, x_read=x_read, beside=beside)
        selection = self.select(x)
        y = sparse_attention(x, *selection, self.W_QKV, self.W_O, rope_dims=self.rope_dims,
                             rope_base=self.rope_base, backend=self.backend, deterministic=self.deterministic,
                             beside=beside)
        return y, selection

    def _dense_heads(self, x: torch.Tensor, qkv: torch.Tensor | None = None) -> torch.Tensor:
        window = self.window(x.shape[1]) if self.dense_kind == "local" else None
        return self.dense(x, window=window, qkv=qkv)

    def _masked(self, x: torch.Tensor) -> bool:
        """Whether the hybrid's sums take only the rows the MoSA heads keep (``MASKED_SUMS``: a hybrid on the
        fused op)."""
        if not (MASKED_SUMS is not False and self.num_mosa_heads and self.dense is not None and self._fused(x)):
            return False
        if MASKED_SUMS is None:
            T = x.shape[1]
            kept = 1.0 - (1.0 - self.num_selected(T) / T) ** self.num_mosa_heads
            return kept <= MASKED_MAX_KEPT
        return True

    def _kept_rows(self, x: torch.Tensor):
        """A cleared [B, T] mask to mark the tokens the MoSA heads keep, where the hybrid's sums take only
        those rows (``_masked``; not under torch.compile), else None."""
        if torch.compiler.is_compiling() or not self._masked(x):
            return None
        return torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)

    def _hybrid_op(self, x: torch.Tensor) -> bool:
        """Whether the MoSA and dense heads run as one op (``HYBRID_OP``: by default under torch.compile and in
        CUDA-graph captures): a hybrid with dense (not local) heads on the fused MoSA op, where the op's attention
        kernels run."""
        if HYBRID_OP is False or not (HYBRID_OP or torch.compiler.is_compiling() or self._captured(x)):
            return False
        return (self.num_mosa_heads > 0 and self.dense is not None and self.dense_kind == "dense" and self._fused(x)
                and self.dense.backend != "torch"
                and hybrid_fused_available(x, self.W_QKV, self.dense.head_dim, self.backend))

    @staticmethod
    def _captured(x: torch.Tensor) -> bool:
        """Whether x's stream is capturing a CUDA graph, where autocast widens x only with ``CAPTURED_WIDE``
        (``HYBRID_OP``)."""
        if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return False
        return CAPTURED_WIDE or not (torch.is_autocast_enabled("cuda")
                                     and x.element_size() > torch.get_autocast_dtype("cuda").itemsize)

    def _hybrid(self, x: torch.Tensor):
        """(y, selection) of both parts through ``ops.hybrid_fused``."""
        return hybrid_fused(x, self.router, self.W_QKV, self.W_O, self.dense.W_QKV.weight, self.dense.W_O.weight,
                            self.num_dense_heads, self.num_selected(x.shape[1]), include_first=self.include_first,
                            rope_dims=self.rope_dims, rope_base=self.rope_base, deterministic=self.deterministic,
                            masked=self._masked(x), rows_only=ROWS_ONLY)

    def _sharing(self, x: torch.Tensor, rows: torch.Tensor | None):
        """(whether the MoSA heads read x through the dense heads' product, the autocast-dtype copy of x that
        product and the MoSA heads then share, or None): see ``_share_input``."""
        dev = x.device.type
        wider = torch.is_autocast_enabled(dev) and x.element_size() > torch.get_autocast_dtype(dev).itemsize
        share = SHARED_INPUT_GRAD
        if share is None:
            share = rows is not None or wider
        if not (share and self.num_mosa_heads and self.dense is not None and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return False, None
        narrow = wider and self._fused(x) and (attention_ops.NARROW_SHARED_X if rows is not None else X_READ)
        return True, (x.detach().to(torch.get_autocast_dtype(dev), memory_format=torch.contiguous_format)
                      if narrow else None)

    def _share_input(self, x: torch.Tensor, rows: torch.Tensor | None, sharing):
        """(the dense heads' QKV product or None, the x the MoSA heads take, the x their kernels read or
        None): in a hybrid that takes gradients, x may reach the MoSA heads through the dense heads' product
        (``SHARED_INPUT_GRAD``, or ``rows`` for the masked sum of x's gradient). Under autocast over wider
        x, one autocast-dtype copy of x (``sharing``'s, made by the caller before the streams fork) serves
        the product and the MoSA heads: as their input with ``rows`` (``ops.attention.NARROW_SHARED_X``),
        else as what the fused op's kernels read (``X_READ``)."""
        share, xc = sharing
        if not share:
            return None, x, None
        qkv, x_mosa = linear_sharing_input(x, self.dense.W_QKV.weight, rows, x_cast=xc)
        return qkv, x_mosa, (xc if rows is None else None)

    @staticmethod
    def _sum(y_mosa, y_dense, rows):
        """y_mosa + y_dense; with ``rows`` (marked by the fused op), at those rows only, in y_dense's memory."""
        if rows is None:
            return y_mosa + y_dense
        return add_at_rows(y_dense, y_mosa, rows)

    def _side_stream(self, x: torch.Tensor):
        """The stream the MoSA heads of a hybrid run on beside the dense heads (``PARALLEL_HEADS``), or None:
        not CUDA, not a hybrid, under torch.compile (which orders the graph itself) or in a distributed run.
        (A high-priority stream for either part changed no time on an H200: benchmarks/NOTES.md v9.0.)"""
        if not (PARALLEL_HEADS and x.is_cuda and self.num_mosa_heads and self.dense is not None):
            return None
        if torch.compiler.is_compiling():
            return None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return None
        return side_stream(x.device, "mosa heads")

    def forward(self, x: torch.Tensor, return_selection: bool = False):
        check_input(x, self.d_model, self.W_QKV.dtype)
        if self._hybrid_op(x):
            y, selection = self._hybrid(x)
            return (y, selection) if return_selection else y
        side = self._side_stream(x)
        if side is not None:
            main = torch.cuda.current_stream(x.device)
            rows = self._kept_rows(x)
            sharing = self._sharing(x, rows)  # (its copy of x, if any, is made before the wait)
            side.wait_stream(main)
            # after the wait: the MoSA heads need x (or its copy), not this product
            qkv, x_mosa, x_read = self._share_input(x, rows, sharing)
            if not MOSA_HEADS_FIRST:
                y_dense = self._dense_heads(x, qkv)
            with torch.cuda.stream(side):
                y, selection = self._mosa_heads(x_mosa, rows, x_read, beside=True)
            if MOSA_HEADS_FIRST:
                y_dense = self._dense_heads(x, qkv)
            main.wait_stream(side)
            # memory handed between the streams: x is read on the side stream, its results used on this one
            for t in (x, x_mosa, x_read):  # (x_mosa, x_read: x or its copy)
                if t is not None:
                    t.record_stream(side)
            if rows is not None:
                rows.record_stream(side)
            for t in (y, *selection, *([self.aux_loss] if self.aux_loss is not None else [])):
                t.record_stream(main)
            y = self._sum(y, y_dense, rows)
        else:
            rows = self._kept_rows(x)
            qkv, x_mosa, x_read = self._share_input(x, rows, self._sharing(x, rows))
            if self.num_mosa_heads:
                y, selection = self._mosa_heads(self._compiled_input(x_mosa), rows, x_read)
            else:
                y, selection = 0, None
            if self.dense is not None:
                y = self._sum(y, self._dense_heads(x, qkv), rows)
        return (y, selection) if return_selection else y

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_mosa_heads={self.num_mosa_heads}, sparsity={self.sparsity:g}, "
                f"head_dim={self.head_dim}, num_dense_heads={self.num_dense_heads}, dense_kind={self.dense_kind!r}, "
                f"include_first={self.include_first}, routing={self.routing!r}"
                + (f", local_window={self.local_window}" if self.local_window else ""))
