"""Autoregressive generation with the sparse KV cache: prefill the prompts in one parallel pass, then decode
one token per step."""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .decode import extend_unchecked, new_cache
from .sampling import check_sampling, sample
from .static import StaticDecoder


class RoutingWarning(UserWarning):
    """A model whose router was never taught the causal (threshold) rule is asked to generate."""


def warn_if_not_causal(model) -> None:
    if not model.config.causal_routing_ready:
        warnings.warn(
            "this model was trained with top-k routing, without the auxiliary router loss and without "
            "calibrated thresholds, so its causal (threshold) routing keeps an arbitrary number of tokens and "
            "its outputs may be poor. Calibrate first (mosa_attention.inference.calibrate_thresholds, or "
            "`mosa generate --calibrate`), or train with router_aux_loss > 0.", RoutingWarning, stacklevel=3)


def not_causal_note(model) -> str | None:
    """The warning's text for a model whose router never learnt the causal rule, else None."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RoutingWarning)
        warn_if_not_causal(model)
    return str(caught[0].message) if caught else None


def _prompts(model, ids) -> tuple[list[list[int]], bool]:
    """(prompts as lists, whether they came as one tensor)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            ids = ids[None]
        model._check_ids("ids", ids)
        return ids.tolist(), True
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ValueError(f"ids must be a [batch, seq_len] tensor or a non-empty list of token lists, got {ids!r:.80}")
    prompts = [list(p) if isinstance(p, (list, tuple)) else None for p in ids]
    V = model.config.vocab_size
    for i, p in enumerate(prompts):
        if p is None or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise ValueError(f"ids[{i}] must be a list of token ids (int), got {ids[i]!r:.80}")
        if not p:
            raise ValueError(f"ids[{i}] is an empty prompt; give at least one token (e.g. the end-of-document id)")
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"ids[{i}] holds token ids outside [0, vocab_size={V}): {bad[:5]}")
    return prompts, False


def generate(model, ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, eos_id: int | None = None,
             capacity: int | None = None, stream: Callable[[torch.Tensor], None] | None = None,
             return_cache: bool = False, fixed_shapes: bool | None = None, compile: bool = False):
    """Sample up to ``max_new_tokens`` tokens after each prompt.

    ids: a [B, T] integer tensor, or a list of B token lists of any lengths (left-padded internally, each
    sequence keeps its own positions). temperature 0 is greedy; ``top_k``/``top_p`` cut the distribution;
    ``seed`` makes sampling repeatable. A sequence stops after ``eos_id`` (later tokens repeat it); all stop
    after ``max_new_tokens``. ``capacity`` bounds each MoSA head's cache (see ``cache.SparseCache``).
    ``stream(tokens [B])`` is called with every new column as it is sampled.

    ``fixed_shapes``: decode through ``static.StaticDecoder`` (every step the same shapes, replayed as a CUDA
    graph on a GPU) instead of the paged cache's ``extend``; None takes it on a GPU, where the paged steps are
    bound by the host, unless ``capacity`` asks for the paged cache's eviction. The same tokens either way, to
    rounding; ``return_cache`` then gives the decoded state as a paged cache (``StaticDecoder.to_cache``).
    ``compile``: the fixed-shape step's torch ops fused by torch.compile (``StaticDecoder(compile=True)``; it
    implies fixed shapes): 1.3-1.7 times the tokens/s of the tiny models at batch 1 on an H200, after a compile
    of ~10-20 s per model and length (docs/generation.md).

    Returns a [B, T + n] tensor for tensor input, else a list of lists (prompt + new tokens, cut after
    ``eos_id``); with ``return_cache`` also the ``KVCache``.
    """
    check_sampling(temperature, top_k, top_p)
    vocab = model.config.vocab_size
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < vocab):
        raise ValueError(f"eos_id must be a token id in [0, vocab_size={vocab}) or None, got eos_id={eos_id!r}")
    if stream is not None and not callable(stream):
        raise ValueError(f"stream must be a callable taking the new tokens, or None, got stream={stream!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got max_new_tokens={max_new_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got seed={seed!r}")
    if fixed_shapes is not None and not isinstance(fixed_shapes, bool):
        raise ValueError(f"fixed_shapes must be True, False or None, got fixed_shapes={fixed_shapes!r}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got compile={compile!r}")
    if compile and fixed_shapes is False:
        raise ValueError("compile=True compiles the fixed-shape steps; it cannot go with fixed_shapes=False")
    if compile:
        fixed_shapes = True
    if fixed_shapes and capacity is not None:
        raise ValueError("fixed_shapes=True keeps every token a MoSA head keeps: it takes no capacity (the paged "
                         "cache's eviction, fixed_shapes=False)")
    prompts, as_tensor = _prompts(model, ids)
    longest = max(len(p) for p in prompts)
    limit = model.config.longest_input
    if longest + max_new_tokens > limit:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the longest "
                         f"sequence this model accepts ({limit}; config.max_seq_len)")
    warn_if_not_causal(model)
    with torch.no_grad():
        return _generate(model, prompts, as_tensor, max_new_tokens, temperature, top_k, top_p, seed, eos_id,
                         capacity, stream, return_cache, fixed_shapes, compile)


def _generate(model, prompts, as_tensor, max_new_tokens, temperature, top_k, top_p, seed, eos_id, capacity, stream,
              return_cache, fixed_shapes, compile):
    longest = max(len(p) for p in prompts)
    device = model.embed.weight.device
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    batch = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        cache = new_cache(model, pad, capacity)
        logits = extend_unchecked(model, batch, cache)[:, -1]  # the prompts (checked above) in one pass
        if fixed_shapes is None:
            fixed_shapes = device.type == "cuda" and capacity is None
        decoder = None
        if fixed_shapes and max_new_tokens > 1:
            decoder = StaticDecoder(model, cache, max_len=longest + max_new_tokens, compile=compile)
            step_fn = decoder.step
        else:
            def step_fn(token):
                return extend_unchecked(model, token[:, None], cache)[:, -1]  # sampled: valid ids
        out, done = [], torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done |= token == eos_id
            out.append(token)
            if stream is not None:
                stream(token)
            if step + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
                break
            logits = step_fn(token)
        if decoder is not None and return_cache:
            cache = decoder.to_cache()
    finally:
        model.train(was_training)

    new = torch.stack(out, 1) if out else batch.new_zeros(len(prompts), 0)
    if as_tensor:
        result = torch.cat([batch, new], 1)
    else:
        result = []
        for p, row in zip(prompts, new.tolist()):
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id) + 1]
            result.append(p + row)
    return (result, cache) if return_cache else result
