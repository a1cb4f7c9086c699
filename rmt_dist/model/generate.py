"""Generation with memory for causal HF backbones: ``rmt_dist.generate``.

The prompt runs segment by segment (each full segment updates the memory, as in training); the last,
open segment is prefilled as ``[read memory ; tokens]`` with the training mask (the read block sees its
whole block), and new tokens are decoded with the model's KV cache inside that segment. When the open
segment holds ``segment_len`` tokens it is closed like any other segment (its write block becomes the
memory) and a new one starts from the next token, so a generation of any length sees exactly what the
model saw in training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rmt_dist.model.backbone import BlockCausal
from rmt_dist.model.hf import HFBackbone
from rmt_dist.model.memory import MemoryModel, MemoryState


def _open_segment(model: MemoryModel, state: MemoryState, tokens: Tensor) -> tuple[Tensor, Any, int]:
    """Prefill ``[read memory ; tokens]``: (logits of the last position [B, V], KV cache, next position)."""
    backbone: HFBackbone = model.backbone
    x = backbone.embed_tokens(tokens)  # [B, n, d]
    read = model.num_tokens  # memtr and rmt: the read block
    if read:
        memory = state.memory if model.spec.write_tokens and state.memory is not None else model.memory_init(x.shape[0])
        x = torch.cat([memory.to(x.dtype), x], dim=1)
    mask = backbone.attention_mask(BlockCausal(read, 0) if read else None, x.shape[1], None, x.dtype, x.device)
    out = backbone.body(inputs_embeds=x, attention_mask=mask, use_cache=True)
    return _logits(model, out.last_hidden_state[:, -1]), out.cache, x.shape[1]


def _logits(model: MemoryModel, h: Tensor) -> Tensor:
    return model.backbone.logits(h)[..., :model.vocab_size]


def _pick(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> Tensor:
    """[B, V] -> [B] next tokens: greedy at temperature 0, else sampled (from the top k if k > 0)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MemoryModel, input_ids: Tensor, *, segment_len: int, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, eos_token_id: int | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """``input_ids`` [B, P] (P >= 1, prompts of equal length: no padding) -> [B, P + new] (stops early
    once every row has produced ``eos_token_id``; rows that ended are filled with it).

    ``model`` is a MemoryModel over a causal HF backbone (``build_model`` with ``model.backbone=hf``, or
    ``from_pretrained``); ``segment_len`` is the one it was trained with.
    """
    if not isinstance(model.backbone, HFBackbone) or model.backbone.is_encoder:
        raise ValueError("generate needs a causal Hugging Face backbone (model.backbone=hf, a causal LM)")
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt length >= 1], got {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    state = model.init_state()
    closed = (input_ids.shape[1] - 1) // segment_len * segment_len  # the last 1..segment_len tokens stay open
    for start in range(0, closed, segment_len):
        state = model(input_ids[:, start:start + segment_len], None, state, with_logits=False).state
    segment = input_ids[:, closed:]
    logits, cache, position = _open_segment(model, state, segment)
    out = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        token = _pick(logits, temperature, top_k, generator)  # [B]
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        out.append(token[:, None])
        if i == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):  # a sync only with eos
            break
        if segment.shape[1] == segment_len:  # close the full segment: its write block is the next memory
            state = model(segment, None, state, with_logits=False).state
            segment = token[:, None]
            logits, cache, position = _open_segment(model, state, segment)
            continue
        segment = torch.cat([segment, token[:, None]], dim=1)
        position_ids = torch.full((token.shape[0], 1), position, device=token.device)
        step = model.backbone.body(inputs_embeds=model.backbone.embed_tokens(token[:, None]), cache=cache,
                                   position_ids=position_ids, use_cache=True)
        logits, cache, position = _logits(model, step.last_hidden_state[:, -1]), step.cache, position + 1
    model.train(was_training)
    return torch.cat(out, dim=1)
