"""A pretrained Hugging Face model as MemoryModel's backbone (``model.backbone=hf``).

The memory logic stays in ``memory.py``; this adapter only presents the HF model through the backbone
interface: ``embed_tokens`` is the model's input embedding, ``forward`` runs the transformer body on
``inputs_embeds`` and ``logits`` is the LM head (causal LMs) or a classification head (encoders).

- Causal LMs (``AutoModelForCausalLM``: GPT-2, Llama, Mistral, Qwen, ...): the segment's RMT mask
  (read block, causal tokens, write block) goes in as a 4D additive mask ``[B, 1, T, T]``, which
  transformers uses as given (``masking_utils._preprocess_mask_arguments``); without memory and
  padding no mask is passed, so the model takes its own causal path (the bare model bit for bit, and
  SDPA's flash kernel on a GPU; transformers 5.24 then checks the position ids for packed sequences
  on the host, one sync per forward that the bare model has too).
- Encoders (``AutoModel``: BERT, RoBERTa, DeBERTa): attention is bidirectional; ``is_encoder`` tells
  MemoryModel to put memory at the start of the segment and read the next memory from the same
  positions (1M-token paper). The head is RoBERTa's classification head (dense, tanh, out) applied
  per position; the data labels one position per sample (see ``data/classify.py``).
- Padding (``valid`` False) is never attended to, so a padded sample computes what it computes alone:
  causal LMs get position ids that count only valid positions (the write block after padding keeps
  its unpadded positions); encoders get the plain 2D padding mask (DeBERTa reads masks as 0/1, not
  additive) and their own position ids, so their padding must trail the tokens (``data/classify.py``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from rmt_dist.config import Config, from_flat, to_flat
from rmt_dist.model.backbone import BlockCausal, Mask
from rmt_dist.model.memory import MemoryModel


def is_causal_lm(name_or_path: str) -> bool:
    """Whether the checkpoint's config names a causal-LM architecture (else it is read as an encoder)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    # BERT/RoBERTa also have a causal LM-head class (decoder fine-tuning); masked-LM types count as encoders.
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


class HFBackbone(nn.Module):
    """``model`` is the loaded HF module (the whole ``*ForCausalLM`` for causal LMs, so tied weights and
    the head stay one module tree for ZeRO-3); ``out_size`` is the encoder head's classes."""

    supports_padding = True

    def __init__(self, model: nn.Module, *, is_encoder: bool, out_size: int = 0,
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        config = model.config
        self.hf = model
        self.is_encoder = is_encoder
        self.d_model = config.hidden_size
        self.n_layers = config.num_hidden_layers
        self.n_heads = config.num_attention_heads
        self.head = None
        if is_encoder:
            if getattr(model, "pooler", None) is not None:  # BERT/RoBERTa: BertModel skips a None pooler
                model.pooler = None  # unused (the head reads every position): no parameter without a gradient
            self.head = nn.Sequential(nn.Linear(self.d_model, self.d_model), nn.Tanh(),
                                      nn.Linear(self.d_model, out_size))
            for layer in (self.head[0], self.head[2]):
                nn.init.normal_(layer.weight, std=getattr(config, "initializer_range", 0.02))
                nn.init.zeros_(layer.bias)
        if activation_checkpointing:
            # Non-reentrant: the same layers run for several segments inside one backward (DESIGN.md).
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    @property
    def body(self) -> nn.Module:
        """The transformer without its LM head (``model.transformer`` for GPT-2, ``model.model`` for Llama)."""
        return self.hf if self.is_encoder else self.hf.base_model

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.hf.get_input_embeddings()(input_ids)

    def attention_mask(self, mask: Mask, T: int, valid: Tensor | None, dtype: torch.dtype,
                       device: torch.device) -> Tensor | None:
        """Causal LMs: [B or 1, 1, T, T] additive mask (0 = may attend); encoders: [B, T] padding mask;
        None for the model's own plain mask. Built on ``device`` (the embeddings'), padding or not."""
        if self.is_encoder:  # bidirectional: the 2D padding mask, the form every encoder takes natively
            return None if valid is None else valid.long()
        if isinstance(mask, BlockCausal):
            allowed = mask.dense(T, device)
        elif mask is None:
            if valid is None:
                return None
            allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        else:
            allowed = mask
        allowed = allowed[None]
        if valid is not None:  # padding is never a key; a row keeps its diagonal (no empty softmax)
            eye = torch.eye(T, dtype=torch.bool, device=device)[None]
            allowed = (allowed & valid[:, None, :]) | eye
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def forward(self, x: Tensor, mask: Mask = None, caches: Sequence[Tensor] | None = None,
                return_layer_inputs: bool = False, side: Sequence | None = None,
                valid: Tensor | None = None) -> tuple[Tensor, None]:
        """x: [B, T, d] embeddings; mask as for the built-in backbone (ignored by encoders: bidirectional);
        valid: [B, T] bool, False = padding. Per-layer caches and side reads (xl, infinite) do not exist
        for HF models (config validation refuses those kinds)."""
        if caches is not None or side is not None or return_layer_inputs:
            raise ValueError("model.backbone=hf supports memory.kind none, memtr and rmt only")
        T = x.shape[1]
        extra: dict[str, Any] = {}
        if not self.is_encoder:  # the write block after padding keeps the positions it has unpadded
            extra["use_cache"] = False
            extra["position_ids"] = None if valid is None else (valid.long().cumsum(1) - 1).clamp(min=0)  # [B, T]
        out = self.body(inputs_embeds=x, attention_mask=self.attention_mask(mask, T, valid, x.dtype, x.device),
                        **extra)
        return out.last_hidden_state, None

    def logits(self, h: Tensor) -> Tensor:
        return self.head(h) if self.is_encoder else self.hf.get_output_embeddings()(h)


def load_backbone(name_or_path: str, *, num_classes: int = 0, activation_checkpointing: bool = False) -> HFBackbone:
    """Load the pretrained weights; ``num_classes`` sizes an encoder's head."""
    from transformers import AutoModel, AutoModelForCausalLM

    causal = is_causal_lm(name_or_path)
    if not causal and num_classes < 1:
        raise ValueError(f"{name_or_path} is an encoder: it needs the number of classes (model.vocab_size)")
    # fp32 master weights whatever the checkpoint's dtype: DeepSpeed's bf16 mode casts and keeps fp32 copies.
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(name_or_path, dtype=torch.float32)
    return HFBackbone(model, is_encoder=not causal, out_size=num_classes,
                      activation_checkpointing=activation_checkpointing)


def build_hf_model(cfg: Config, vocab_size: int = 0) -> MemoryModel:
    """MemoryModel over ``model.hf_name_or_path``: ``vocab_size`` is the classes of an encoder's head, or
    (causal LMs) the tokenizer's vocabulary, at most the model's (0 = the model's)."""
    backbone = load_backbone(cfg.model.hf_name_or_path, num_classes=vocab_size,
                             activation_checkpointing=cfg.train.activation_checkpointing)
    model_vocab = backbone.hf.config.vocab_size
    if not backbone.is_encoder and vocab_size > model_vocab:
        raise ValueError(f"model.vocab_size must be <= the vocabulary of {cfg.model.hf_name_or_path} "
                         f"({model_vocab}), got {vocab_size}")
    # Encoders read documents, padded to whole segments (data/classify.py); causal LMs read streams.
    model = MemoryModel(backbone, cfg.memory, vocab_size or model_vocab, padded_inputs=backbone.is_encoder)
    if model.memory_init is not None:  # memory starts at the scale of the pretrained token embeddings
        embeddings = backbone.hf.get_input_embeddings().weight
        with torch.no_grad(), _gathered(embeddings):
            model.memory_init.weight.normal_(0.0, float(embeddings.std()))
    return model


def _gathered(weight: Tensor) -> contextlib.AbstractContextManager:
    """The whole weight inside the block, also when ZeRO-3 partitioned it at load (``train/engine.py``)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight])


MEMORY_CONFIG = "rmt_memory.json"
MEMORY_WEIGHTS = "rmt_memory.safetensors"


def save_pretrained(model: MemoryModel, directory: str | Path, cfg: Config, tokenizer: Any = None) -> None:
    """A Hugging Face-style directory: the backbone's own ``save_pretrained`` files (config.json,
    model.safetensors), the tokenizer if given, and the memory: ``rmt_memory.json`` (``model.*``,
    ``memory.*`` and ``data.segment_len`` of ``cfg``) and ``rmt_memory.safetensors`` (the learned initial
    memory and the encoder head). ``model`` must be whole (after ZeRO-3: see ``train/export.py``)."""
    from safetensors.torch import save_file

    if not isinstance(model.backbone, HFBackbone):
        raise ValueError("save_pretrained needs model.backbone=hf")
    directory = Path(directory)
    model.backbone.hf.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    own = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("backbone.hf.")}
    save_file(own, directory / MEMORY_WEIGHTS)
    flat = {k: v for k, v in to_flat(cfg).items() if k.split(".")[0] in ("model", "memory")}
    flat.update({"model.hf_name_or_path": str(directory), "model.vocab_size": model.vocab_size,
                 "data.segment_len": cfg.data.segment_len})
    (directory / MEMORY_CONFIG).write_text(json.dumps(flat, indent=1))


def from_pretrained(directory: str | Path) -> tuple[MemoryModel, Config]:
    """The model :func:`save_pretrained` wrote, and its config (``data.segment_len`` is the segment length
    it was trained with); in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = from_flat({**json.loads((directory / MEMORY_CONFIG).read_text()), "model.hf_name_or_path": str(directory)})
    model = build_hf_model(cfg, cfg.model.vocab_size)
    missing, unexpected = model.load_state_dict(load_file(directory / MEMORY_WEIGHTS), strict=False)
    missing = [k for k in missing if not k.startswith("backbone.hf.")]
    if missing or unexpected:
        raise ValueError(f"{directory / MEMORY_WEIGHTS} does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval(), cfg
