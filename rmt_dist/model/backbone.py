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
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from rmt_dist.config import ModelConfig


def rotary_tables(n: int, head_dim: int, base: float, device: torch.device,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of shape [n, r] for positions 0..n-1 (rotate-half convention), r = head_dim rounded
    down to even: an odd head (the paper's WikiText-103 model has 410 / 10 = 41) keeps its last
    channel unrotated."""
    r = head_dim - head_dim % 2
    inv_freq = 1.0 / (base ** (torch.arange(0, r, 2, device=device, dtype=torch.float32) / r))
    angles = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv_freq)  # [n, r/2]
    angles = torch.cat([angles, angles], dim=-1)  # [n, r]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, hd]; cos/sin: [T, r] with r = hd or hd - 1 (the rest passes through)."""
    r = cos.shape[-1]
    x_rot = x[..., :r]
    half = r // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = x_rot * cos + rotated * sin
    return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], dim=-1)


# Ops whose outputs selective recomputation keeps: the matmuls and attention kernels (the FLOPs). Everything
# else in a block (norms, GELU, rotary, residual adds, copies) is recomputed in backward.
_KEPT_OPS = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
) if hasattr(torch.ops.aten, name)}


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


CHECKPOINT_CONTEXTS = {
    "all": noop_context_fn,  # keep only each block's input
    "elementwise": functools.partial(create_selective_checkpoint_contexts, _keep_matmuls),
}


@dataclass(frozen=True)
class BlockCausal:
    """A mask by structure: rows ``[prefix ; tokens ; suffix]`` and no cache. Prefix rows see the whole
    prefix, token rows the prefix and earlier tokens, suffix rows everything: RMT's read/write layout
    (memtr: no suffix). Attention runs it as one causal call over ``[prefix ; tokens]`` (the fast
    kernels' ``is_causal`` path, as with no memory) plus two small unmasked calls, instead of one call
    with a dense mask; :meth:`dense` is the same mask as booleans."""

    prefix: int
    suffix: int

    def dense(self, T: int, device: torch.device | None = None) -> Tensor:
        """[T, T] bool, True = may attend."""
        p, n = self.prefix, T - self.suffix
        mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask[:p, :p] = True
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

    def forward(self, h: Tensor, context: Tensor, mask: Mask, cos: Tensor, sin: Tensor) -> Tensor:
        """h: [B, T, d] queries' inputs; context: [B, C + T, d] keys'/values' inputs (h is its tail)."""
        B, T, d = h.shape
        S = context.shape[1]
        q = self.q(h)
        kv = self.kv(context)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k, v = kv.view(B, S, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, S, hd] each
        q = apply_rotary(q, cos[S - T:], sin[S - T:])
        k = apply_rotary(k, cos, sin)
        p = self.dropout if self.training else 0.0
        if isinstance(mask, BlockCausal):
            y = self._block_causal(q, k, v, mask.prefix, T - mask.suffix, p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(B, T, d))

    @staticmethod
    def _block_causal(q: Tensor, k: Tensor, v: Tensor, prefix: int, n: int, p: float) -> Tensor:
        """BlockCausal(prefix, T - n) on [B, H, T, hd]; rows [prefix, n) are the causal tokens."""
        sdpa = F.scaled_dot_product_attention
        parts = [sdpa(q[:, :, :n], k[:, :, :n], v[:, :, :n], is_causal=True, dropout_p=p)]  # [B, H, n, hd]
        if prefix:  # the prefix rows above were causal within the prefix: recompute them over all of it
            parts = [sdpa(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], dropout_p=p), parts[0][:, :, prefix:]]
        if n < q.shape[2]:
            parts.append(sdpa(q[:, :, n:], k, v, dropout_p=p))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: Tensor | None, mask: Mask, cos: Tensor, sin: Tensor,
                side: SideRead | None = None) -> Tensor:
        h = self.ln1(x)
        context = h if cache is None else torch.cat([self.ln1(cache), h], dim=1)
        a = self.attn(h, context, mask, cos, sin)
        if side is not None:
            a = a + side(h)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.ln2(x)))


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
        self.recompute = "all"  # with activation checkpointing: a key of CHECKPOINT_CONTEXTS
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, out_size or vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.embed(input_ids)

    def forward(
        self,
        x: Tensor,
        mask: Mask = None,
        caches: Sequence[Tensor] | None = None,
        return_layer_inputs: bool = False,
        side: Sequence[SideRead | None] | None = None,
    ) -> tuple[Tensor, list[Tensor] | None]:
        """x: [B, T, d]; mask: [T, C + T] bool, a BlockCausal (no cache) or None (plain causal);
        caches: per layer [B, C, d]; side: per layer an optional read added to the attention output
        (it runs inside the block, so activation checkpointing recomputes it too).

        Returns the final hidden states [B, T, d] (after the final LayerNorm) and, if asked, each
        block's input (what a Transformer-XL cache stores).
        """
        T = x.shape[1]
        C = 0 if caches is None else caches[0].shape[1]
        if C and not isinstance(mask, Tensor):
            raise ValueError("a cache needs an explicit [T, C + T] mask")
        cos, sin = rotary_tables(C + T, self.head_dim, self.rope_base, x.device, x.dtype)
        x = self.drop(x)
        layer_inputs: list[Tensor] | None = [] if return_layer_inputs else None
        for i, block in enumerate(self.blocks):
            if layer_inputs is not None:
                layer_inputs.append(x)
            cache = caches[i] if caches is not None and C else None
            read = side[i] if side is not None else None
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cache, mask, cos, sin, read, use_reentrant=False,
                               context_fn=CHECKPOINT_CONTEXTS[self.recompute])
            else:
                x = block(x, cache, mask, cos, sin, read)
        return self.ln_f(x), layer_inputs

    def logits(self, h: Tensor) -> Tensor:
        return self.head(h)
