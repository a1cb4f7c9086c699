"""The built-in backbone: a decoder-only pre-LN transformer over embeddings.

It knows nothing of memory: callers hand it embeddings ``x`` of shape [B, T, d], an optional boolean
attention mask [T, C + T] (True = may attend) or a structured ``BlockCausal`` one, and optional
per-layer caches of C earlier layer inputs (Transformer-XL) and optional per-layer side reads
(callables ``h -> [B, T, d]`` added to the attention output: ∞-former's long-term memory). Positions are rotary, counted over
``[cache ; x]``, so memory tokens and cached states get positions like any other token and relative
distances stay right.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from rmt_dist.config import ModelConfig


def rotary_tables(n: int, head_dim: int, base: float, device: torch.device,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and signed sin of shape [n, r] for positions 0..n-1 (rotate-half convention), r = head_dim rounded
    down to even: an odd head (the paper's WikiText-103 model has 410 / 10 = 41) keeps its last
    channel unrotated. The sin table's first half is negated: rotate-half's sign is folded into the table,
    so :func:`apply_rotary` swaps the halves with one ``roll`` instead of a negation and a concatenation."""
    r = head_dim - head_dim % 2
    inv_freq = 1.0 / (base ** (torch.arange(0, r, 2, device=device, dtype=torch.float32) / r))
    angles = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv_freq)  # [n, r/2]
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos().to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, hd]; cos/sin: [T, r] from :func:`rotary_tables`, r = hd or hd - 1 (the rest passes
    through). x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] = [x2, x1] * sign (in sin)."""
    r = cos.shape[-1]
    half = r // 2
    if r == x.shape[-1]:  # 3 kernels forward (roll, mul, addcmul), no slices to scatter back in backward
        return torch.addcmul(x * cos, x.roll(half, dims=-1), sin)
    x_rot = x[..., :r]
    swapped = torch.cat([x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([torch.addcmul(x_rot * cos, swapped, sin), x[..., r:]], dim=-1)


# Ops whose outputs selective recomputation keeps: the matmuls and attention kernels (the FLOPs). Everything
# else in a block (norms, GELU, rotary, residual adds, copies) is recomputed in backward.
_KEPT_OPS = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
) if hasattr(torch.ops.aten, name)}


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@dataclass(frozen=True)
class BlockCausal:
    """A mask by structure: rows ``[prefix ; tokens ; suffix]`` after ``cache`` earlier states. Every row
    sees the cache; prefix rows see the whole prefix, token rows the prefix and earlier tokens, suffix rows
    everything: RMT's read/write layout (memtr: no suffix; xl: no prefix or suffix, only the cache).
    :meth:`dense` is the same mask as booleans; the backbone turns it into an additive mask once per
    shape and reuses it (one attention call per layer, no mask built per segment)."""

    prefix: int
    suffix: int
    cache: int = 0

    def dense(self, T: int, device: torch.device | None = None) -> Tensor:
        """[T, cache + T] bool, True = may attend."""
        p, n, c = self.prefix, T - self.suffix, self.cache
        mask = torch.ones(T, c + T, dtype=torch.bool, device=device).tril(c)
        mask[:p, c:c + p] = True
        mask[n:] = True
        return mask


Mask = Union[Tensor, BlockCausal, None]
SideRead = Callable[[Tensor], Tensor]  # [B, T, d] normalised block input -> [B, T, d], added to attention


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        # Separate modules (not slices of one qkv weight): ZeRO-3 gathers parameters per module call.
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, h: Tensor, context: Tensor, mask: Tensor | None, cos: Tensor, sin: Tensor) -> Tensor:
        """h: [B, T, d] queries' inputs; context: [B, C + T, d] keys'/values' inputs (h is its tail); mask:
        additive [T, C + T] or None (causal)."""
        B, T, d = h.shape
        S = context.shape[1]
        q = self.q(h)
        kv = self.kv(context)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k, v = kv.view(B, S, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, S, hd] each
        q = apply_rotary(q, cos[S - T:], sin[S - T:])
        k = apply_rotary(k, cos, sin)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: Tensor | None, mask: Tensor | None, cos: Tensor, sin: Tensor,
                side: SideRead | None = None) -> Tensor:
        h = self.ln1(x)
        context = h if cache is None else torch.cat([self.ln1(cache), h], dim=1)
        a = self.attn(h, context, mask, cos, sin)
        if side is not None:
            a = a + side(h)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.ln2(x)))


def run_block(block: Block, x: Tensor, cache: Tensor | None, mask: Tensor | None, cos: Tensor, sin: Tensor,
              side: SideRead | None, recompute: str | None) -> Tensor:
    """One block; with ``recompute`` under non-reentrant activation checkpointing: ``all`` keeps only the
    block's input, ``elementwise`` also the matmul and attention outputs (``_keep_matmuls``). The unit that :func:`apply_compile` compiles, checkpointing inside it (torchtitan's
    order: activation checkpointing first, then compile), so selective recomputation works compiled too."""
    if recompute is None:
        return block(x, cache, mask, cos, sin, side)
    if recompute == "all":
        return checkpoint(block, x, cache, mask, cos, sin, side, use_reentrant=False)
    # The partial is made here: dynamo traces a selective policy only when it sees the partial built.
    return checkpoint(block, x, cache, mask, cos, sin, side, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_matmuls))


def apply_compile(backbone: "TransformerBackbone", backend: str = "inductor") -> None:
    """``torch.compile`` every block (``train.compile``): one compiled function shared by all blocks (the
    blocks are alike, so dynamo compiles each variant once: with and without gradients, checkpointing, a
    cache). Everything between blocks (memory assembly, the LM head, the recurrence) stays eager, so the
    BPTT modes, replay and DeepSpeed ZeRO 0-2 see the same module tree and parameters. Not with ZeRO-3
    (config validation refuses it): dynamo traces ZeRO-3's per-submodule parameter hooks and recompiled at
    every call here (DeepSpeed 0.19.8; bench/gpu_suite.py --smoke measured 21 s a step)."""
    backbone.run_block = torch.compile(run_block, backend=backend)


class TransformerBackbone(nn.Module):
    """Token embedding, N pre-LN blocks, final LayerNorm and an LM head of ``out_size`` classes."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, out_size: int | None = None) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.n_layers = cfg.n_layers
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rope_base = cfg.rope_base
        self.activation_checkpointing = False
        self.recompute = "all"  # with activation checkpointing: all | elementwise (run_block)
        self.run_block = run_block  # apply_compile swaps in the compiled one
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, out_size or vocab_size, bias=False)
        self.apply(self._init_weights)
        # Rotary tables and additive masks per shape, device and dtype: built once, not every segment.
        self._constants: dict[tuple, Any] = {}

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.embed(input_ids)

    def _constant(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()`` once per key (tensors made under inference mode are kept apart: autograd refuses them)."""
        key = key + (torch.is_inference_mode_enabled(),)
        if key not in self._constants:
            if len(self._constants) > 64:  # many shapes (evaluation of odd lengths): start over
                self._constants.clear()
            self._constants[key] = make()
        return self._constants[key]

    def attention_mask(self, mask: Mask, T: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """An additive [T, C + T] mask (0 or -inf) or None (causal): SDPA takes one call per layer with it.
        A BlockCausal is built once per shape; a boolean tensor is converted once per forward (SDPA would
        convert it in every layer)."""
        if mask is None:
            return None
        if isinstance(mask, BlockCausal):
            return self._constant(("mask", mask, T, device, dtype), lambda: _additive(mask.dense(T, device), dtype))
        return _additive(mask, dtype)

    def forward(
        self,
        x: Tensor,
        mask: Mask = None,
        caches: Sequence[Tensor] | None = None,
        return_layer_inputs: bool = False,
        side: Sequence[SideRead | None] | None = None,
    ) -> tuple[Tensor, list[Tensor] | None]:
        """x: [B, T, d]; mask: [T, C + T] bool, a BlockCausal (with ``cache`` = C) or None (plain causal);
        caches: per layer [B, C, d]; side: per layer an optional read added to the attention output
        (it runs inside the block, so activation checkpointing recomputes it too).

        Returns the final hidden states [B, T, d] (after the final LayerNorm) and, if asked, each
        block's input (what a Transformer-XL cache stores).
        """
        T = x.shape[1]
        C = 0 if caches is None else caches[0].shape[1]
        if C and (mask is None or (isinstance(mask, BlockCausal) and mask.cache != C)):
            raise ValueError(f"a cache of {C} states needs a [T, {C} + T] mask or a BlockCausal with cache={C}")
        cos, sin = self._constant(("rope", C + T, x.device, x.dtype), lambda: rotary_tables(
            C + T, self.head_dim, self.rope_base, x.device, x.dtype))
        mask = self.attention_mask(mask, T, x.device, x.dtype)
        recompute = self.recompute if self.activation_checkpointing and torch.is_grad_enabled() else None
        x = self.drop(x)
        layer_inputs: list[Tensor] | None = [] if return_layer_inputs else None
        for i, block in enumerate(self.blocks):
            if layer_inputs is not None:
                layer_inputs.append(x)
            cache = caches[i] if caches is not None and C else None
            read = side[i] if side is not None else None
            x = self.run_block(block, x, cache, mask, cos, sin, read, recompute)
        return self.ln_f(x), layer_inputs

    def logits(self, h: Tensor) -> Tensor:
        return self.head(h)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean mask [T, S] -> 0 / -inf in ``dtype``, in storage whose rows are padded to a multiple of 16
    elements: CUDA's memory-efficient attention needs that alignment and would pad (copy) the mask in every
    call otherwise."""
    T, S = allowed.shape
    storage = torch.zeros(T, -(-S // 16) * 16, dtype=dtype, device=allowed.device)
    additive = storage[:, :S]
    return additive.masked_fill_(allowed.logical_not(), float("-inf"))
