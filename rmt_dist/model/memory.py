"""Memory kinds as a pure per-segment step: ``(segment, state) -> (logits, loss, new state)``.

The step knows one segment; the recurrence over segments (BPTT modes, replay) lives in
``recurrence.py``; what each kind puts around a segment is ``rmt_dist/memory_kinds.py``. ∞-former's
long-term memory (``ltm.py``; stop-gradient) is read by continuous attention added to each block's
attention; with xl_len > 0 the XL cache is its short-term memory and the LTM takes what leaves it.

Encoder backbones (``backbone.is_encoder``, HF BERT-likes: bidirectional attention) take
``[mem ; tokens]`` and the next memory from the same positions (1M-token paper). A model built with
``padded_inputs`` (backbones with ``supports_padding``; encoders by default) accepts ``PAD_ID`` in
``input_ids``: padding is never attended to, and a sample with no token in a segment keeps its memory.
Whether a batch holds padding is not looked up per segment: that would make the host wait for the
device every segment (``bool(tensor.any())``), so a padded model always takes the padded path.

Nothing in the step waits for the device: no ``.item()``, no branch on a tensor's value (tested by
running every kind on the ``meta`` device).

Mask rows (True = may attend): memory blocks see their whole own block; the read block and memtr
memory never see the segment's tokens (that would leak future tokens to earlier positions); tokens
see cache, read memory and earlier tokens; the write block sees everything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rmt_dist.config import MemoryConfig
from rmt_dist.constants import IGNORE_INDEX, PAD_ID
from rmt_dist.memory_kinds import memory_kind
from rmt_dist.model import ltm as ltm_lib
from rmt_dist.model.backbone import BlockCausal


@dataclass
class MemoryState:
    """What one segment hands the next. ``None`` fields mean "start of a sequence".

    Every field is None, a tensor or a tuple of tensors (one per layer); ``map``, ``tensors`` and the
    state dict go over the fields, so a new kind of state is one new field here.
    """

    memory: Tensor | None = None  # [B, m, d] H_write of the previous segment (rmt, rmt_xl)
    xl: tuple[Tensor, ...] | None = None  # per layer [B, c, d] cached block inputs (xl, rmt_xl, infinite)
    ltm: tuple[Tensor, ...] | None = None  # per layer [B, N, d] LTM coefficients, fp32 or wider (infinite)

    def _fields(self) -> Iterator[tuple[str, Tensor | tuple[Tensor, ...] | None]]:
        return ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))

    def map(self, fn: Callable[[Tensor], Tensor]) -> "MemoryState":
        """The same state with ``fn`` applied to every tensor (detach, ``.to(device)``)."""
        def apply(value: Tensor | tuple[Tensor, ...] | None) -> Tensor | tuple[Tensor, ...] | None:
            if value is None:
                return None
            return fn(value) if isinstance(value, Tensor) else tuple(fn(t) for t in value)

        return MemoryState(**{name: apply(value) for name, value in self._fields()})

    def detach(self) -> "MemoryState":
        return self.map(Tensor.detach)

    def tensors(self) -> list[Tensor]:
        out: list[Tensor] = []
        for _, value in self._fields():
            out.extend(() if value is None else [value] if isinstance(value, Tensor) else value)
        return out

    def state_dict(self) -> dict[str, Tensor | list[Tensor] | None]:
        """The fields as tensors and lists of tensors: what ``torch.load(weights_only=True)`` reads back."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in self._fields()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the fields from a :meth:`state_dict`. A field it lacks is None (the start of a sequence):
        checkpoints written before a field existed (``ltm``) still load."""
        names = [f.name for f in dataclasses.fields(self)]
        if set(state) - set(names):
            raise ValueError(f"MemoryState has no fields {sorted(set(state) - set(names))}")
        for name in names:
            value = state.get(name)
            setattr(self, name, tuple(value) if isinstance(value, (list, tuple)) else value)

    def nbytes(self) -> int:
        """Bytes of recurrent state for the whole batch."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class SegmentOutput:
    logits: Tensor | None  # [B, L, V]; None when run with_logits=False
    state: MemoryState
    loss_sum: Tensor  # scalar: summed token cross-entropy (+ weighted aux loss)
    n_tokens: Tensor  # scalar long: labelled tokens in the segment


def segment_mask(kind: str, m: int, L: int, c: int, device: torch.device | None = None) -> Tensor | None:
    """Boolean [T, c + T] mask for one segment of the given kind, or None for plain causal. (The model
    passes the same mask by structure, ``BlockCausal(read, write, c)``; this is its reference.)"""
    spec = memory_kind(kind)
    read = m if spec.read_tokens else 0
    write = m if spec.write_tokens else 0
    if read + write + c == 0:
        return None
    T = read + L + write
    mask = torch.zeros(T, c + T, dtype=torch.bool, device=device)
    cols_read = slice(c, c + read)
    cols_tok = slice(c + read, c + read + L)
    mask[:, :c] = True  # everything sees the cache
    mask[:read, cols_read] = True  # read block: its own block only
    mask[read:read + L, cols_read] = True
    mask[read:read + L, cols_tok] = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    mask[read + L:, :] = True  # write block sees everything
    return mask


def _at_least_fp32(x: Tensor) -> Tensor:
    """The loss in fp32 under bf16/fp16, and in the model's own precision above that."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class InitialMemory(nn.Module):
    """The learned memory of the first segment (m x d). A module of its own so that ZeRO-3, which
    gathers parameters in module forward hooks, materialises it."""

    def __init__(self, num_tokens: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_tokens, d_model) * 0.02)

    def forward(self, batch_size: int) -> Tensor:
        return self.weight.expand(batch_size, -1, -1)


class MemoryModel(nn.Module):
    """A backbone plus one memory kind; ``forward`` is the per-segment computation.

    ``backbone`` provides ``embed_tokens(ids)``, ``forward(x, mask, caches, return_layer_inputs, side)``,
    ``logits(h)``, ``d_model``, ``n_layers`` and ``n_heads`` (see ``backbone.TransformerBackbone``).
    """

    def __init__(self, backbone: nn.Module, memory: MemoryConfig, vocab_size: int, *,
                 padded_inputs: bool = False) -> None:
        super().__init__()
        if padded_inputs and not getattr(backbone, "supports_padding", False):
            raise ValueError(f"{type(backbone).__name__} takes no padding (padded_inputs needs supports_padding)")
        self.backbone = backbone
        self.padded_inputs = padded_inputs
        self.kind = memory.kind
        self.spec = memory_kind(memory.kind)
        self.vocab_size = vocab_size
        self.num_tokens = memory.num_tokens if self.spec.memory_tokens else 0
        self.xl_len = memory.xl_len if self.spec.xl_cache else 0
        self.aux_loss_weight = memory.aux_loss_weight
        self.encoder_layout = getattr(backbone, "is_encoder", False)
        self.memory_init = InitialMemory(self.num_tokens, backbone.d_model) if self.num_tokens else None
        self.ltm_basis = memory.ltm_basis if self.spec.ltm else 0
        self.ltm_tau, self.ltm_ridge, self.ltm_samples, self.sticky = (
            memory.ltm_tau, memory.ltm_ridge, memory.ltm_samples, memory.sticky)
        # One continuous attention per layer (own projections: ZeRO-3 gathers them when each is called).
        self.ltm_attention = nn.ModuleList(
            ltm_lib.ContinuousAttention(backbone.d_model, backbone.n_heads, self.ltm_basis)
            for _ in range(backbone.n_layers)) if self.ltm_basis else None
        if self.ltm_attention is not None:
            self.ltm_attention.apply(backbone._init_weights)

    @property
    def recurrent(self) -> bool:
        """Whether a segment's output depends on earlier segments."""
        return self.spec.recurrent

    def init_state(self) -> MemoryState:
        return MemoryState()

    def state_bytes_per_sequence(self, dtype: torch.dtype = torch.float32) -> int:
        """Size of the recurrent state of one sequence: m vectors (rmt), xl_len x layers (xl), both; plus
        N x layers LTM coefficients (infinite, kept in fp32 or wider), however long the past."""
        vectors = (self.num_tokens if self.spec.write_tokens else 0) + self.xl_len * self.backbone.n_layers
        size = torch.tensor([], dtype=dtype).element_size()
        ltm_size = torch.tensor([], dtype=torch.promote_types(dtype, torch.float32)).element_size()
        return (vectors * size + self.ltm_basis * self.backbone.n_layers * ltm_size) * self.backbone.d_model

    @property
    def carries_gradient(self) -> bool:
        """Whether gradients flow from one segment into earlier ones (the XL cache and the LTM are
        stop-gradient)."""
        return self.spec.carries_gradient

    @torch.no_grad()
    def _ltm_update(self, state: MemoryState, layer_inputs: list[Tensor], caches: tuple[Tensor, ...] | None,
                    reads: list[ltm_lib.LTMRead] | None) -> tuple[Tensor, ...] | None:
        """Each layer's next LTM coefficients (stop-gradient): the states that leave the XL cache this
        segment (all the segment's states without a cache) go into the signal; none leaving keeps it."""
        ltm = []
        for i, li in enumerate(layer_inputs):
            coeffs = None if state.ltm is None else state.ltm[i]
            full = li if caches is None else torch.cat([caches[i], li], dim=1)
            leaving = full[:, :full.shape[1] - self.xl_len] if self.xl_len else full  # [B, n, d]
            if leaving.shape[1] == 0:
                ltm.append(coeffs)
                continue
            dtype = torch.promote_types(li.dtype, torch.float32)
            centres, widths = ltm_lib.basis(self.ltm_basis, li.device, dtype)
            histogram = None
            if self.sticky and reads is not None:
                histogram = ltm_lib.attention_histogram(reads[i].mean.to(dtype), reads[i].var.to(dtype),
                                                        self.ltm_basis)
            ltm.append(ltm_lib.update(coeffs, leaving.to(dtype), centres, widths, tau=self.ltm_tau,
                                      ridge=self.ltm_ridge, samples=self.ltm_samples, histogram=histogram))
        return None if all(c is None for c in ltm) else tuple(ltm)

    def forward(self, input_ids: Tensor, labels: Tensor | None, state: MemoryState, *,
                with_logits: bool = True) -> SegmentOutput:
        """One segment. input_ids, labels: [B, L] (labels already aligned, IGNORE_INDEX = no loss).

        ``with_logits=False`` computes only the next state (no LM head, no loss: ``logits`` is None and
        the loss zero): what the recurrence needs for segments whose loss it does not backpropagate.
        The head is the largest layer with a big vocabulary (267k words on WikiText-103).
        """
        B, L = input_ids.shape
        m, kind = self.num_tokens, self.spec  # m = 0 for kinds without memory tokens
        pad = input_ids == PAD_ID if self.padded_inputs else None  # [B, L]
        padded = pad is not None
        x = self.backbone.embed_tokens(input_ids.masked_fill(pad, 0) if padded else input_ids)  # [B, L, d]
        if kind.write_tokens:  # read = write = the carried memory (the learned one at the start)
            mem = self.memory_init(B).to(x.dtype) if state.memory is None else state.memory.to(x.dtype)
            x = torch.cat([mem, x] if self.encoder_layout else [mem, x, mem], dim=1)  # [B, m + L (+ m), d]
        elif m:  # memtr: the learned memory, the same every segment
            x = torch.cat([self.memory_init(B).to(x.dtype), x], dim=1)  # [B, m + L, d]
        caches = state.xl if self.xl_len and state.xl is not None else None
        c = 0 if caches is None else caches[0].shape[1]
        read = m
        write = m if kind.write_tokens and not self.encoder_layout else 0
        extra: dict[str, Tensor] = {}
        if padded:  # [B, T] False at padding; memory positions are always valid
            extra["valid"] = torch.cat([pad.new_zeros(B, read), pad, pad.new_zeros(B, write)], dim=1).logical_not()
        # The mask by structure (segment_mask's rows); the backbone builds it once per shape.
        mask = BlockCausal(read, write, c) if read + write + c else None
        reads = None
        if self.ltm_attention is not None and state.ltm is not None:
            reads = [ltm_lib.LTMRead(att, coeffs) for att, coeffs in zip(self.ltm_attention, state.ltm)]
        h, layer_inputs = self.backbone(x, mask=mask, caches=caches, side=reads,
                                        return_layer_inputs=bool(self.xl_len or self.ltm_attention is not None),
                                        **extra)

        h_tokens = h[:, read:read + L]  # [B, L, d]
        new_memory = None
        if kind.write_tokens:  # [B, m, d] = H_write (encoders: the output at the read positions)
            # A copy, not a view: a state that outlives this segment (replay, streams, checkpoints) must
            # not keep the whole segment's hidden states alive through the view's storage.
            new_memory = (h[:, :m] if self.encoder_layout else h[:, read + L:]).clone()
            if padded:  # a sample with no token in this segment keeps its memory
                new_memory = torch.where(pad.all(dim=1)[:, None, None], mem, new_memory)
        new_xl = None
        if self.xl_len:  # per layer: the last xl_len token states (block inputs) of cache + this segment
            new_xl = tuple(
                (li[:, read:read + L] if cache is None else torch.cat([cache, li[:, read:read + L]], dim=1))[
                    :, -self.xl_len:
                ].detach().clone()  # a copy: see new_memory
                for li, cache in zip(layer_inputs, caches or [None] * len(layer_inputs))
            )
        new_ltm = None if self.ltm_attention is None else self._ltm_update(state, layer_inputs, caches, reads)
        state_out = MemoryState(memory=new_memory, xl=new_xl, ltm=new_ltm)
        n_tokens = (torch.zeros((), dtype=torch.long, device=x.device) if labels is None
                    else (labels != IGNORE_INDEX).sum())
        if not with_logits:
            return SegmentOutput(logits=None, state=state_out, loss_sum=h.new_zeros(()), n_tokens=n_tokens)

        logits = self.backbone.logits(h_tokens)[..., : self.vocab_size]  # [B, L, V]
        if labels is None:
            loss_sum = _at_least_fp32(logits).new_zeros(())
        else:
            loss_sum = F.cross_entropy(_at_least_fp32(logits).reshape(B * L, -1), labels.reshape(B * L),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
        if self.aux_loss_weight and new_memory is not None:
            # The write block predicts a fixed extra class (index vocab_size) from memory (RMT + XL's aux
            # loss), weighted per labelled token so that dividing by the token count keeps the weight.
            aux_logits = _at_least_fp32(self.backbone.logits(new_memory))  # [B, m, V + 1]
            target = torch.full(aux_logits.shape[:2], self.vocab_size, device=aux_logits.device)
            aux = F.cross_entropy(aux_logits.reshape(-1, aux_logits.shape[-1]), target.reshape(-1))
            loss_sum = loss_sum + self.aux_loss_weight * aux * n_tokens.clamp(min=1)
        return SegmentOutput(logits=logits, state=state_out, loss_sum=loss_sum, n_tokens=n_tokens)
