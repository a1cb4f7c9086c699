"""What each ``memory.kind`` is: one table that the model, config validation, sweeps, the report and the
benchmarks read, instead of each spelling the kinds it means as a string tuple.

Layout of one segment's input per kind (decoder-only; PAPERS.md section 1)::

    none      [tokens]
    memtr     [mem ; tokens]             learned memory, the same every segment (Memory Transformer)
    xl        [tokens]   + per-layer cache of earlier token states (Transformer-XL, stop-gradient)
    rmt       [read ; tokens ; write]    read = write = the previous segment's H_write (RMT)
    rmt_xl    [read ; tokens ; write]  + the XL cache
    infinite  [tokens]   + per-layer continuous long-term memory (∞-former), optionally the XL cache

No torch here: ``config.py`` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryKind:
    name: str
    description: str
    read_tokens: bool = False  # memory tokens before the segment's tokens (memory.num_tokens of them)
    write_tokens: bool = False  # a write block whose output is the next segment's memory: recurrence
    xl_cache: bool = False  # a per-layer cache of earlier token states (memory.xl_len)
    xl_required: bool = False  # ... that must hold at least one state
    ltm: bool = False  # ∞-former's continuous long-term memory (memory.ltm_*)
    hf: bool = False  # allowed with model.backbone=hf (HF models take no per-layer cache or side input)
    without_tokens: str | None = None  # the kind it is with memory.num_tokens=0 (the sweeps' baseline row)

    @property
    def memory_tokens(self) -> bool:
        """Whether the kind has memory tokens at all (memory.num_tokens applies)."""
        return self.read_tokens

    @property
    def recurrent(self) -> bool:
        """Whether a segment's output depends on earlier segments."""
        return self.write_tokens or self.xl_cache or self.ltm

    @property
    def carries_gradient(self) -> bool:
        """Whether gradients flow from a segment into earlier ones (the XL cache and the LTM are
        stop-gradient): only then does memory.bptt_unroll change anything."""
        return self.write_tokens

    def memory_size(self, num_tokens: int, xl_len: int) -> str:
        """The paper's "memory" column: tokens, cache length, or cache + tokens."""
        parts = ([str(xl_len)] if self.xl_required else []) + ([str(num_tokens)] if self.read_tokens else [])
        return "+".join(parts) or "0"


MEMORY_KINDS: dict[str, MemoryKind] = {k.name: k for k in (
    MemoryKind("none", "no memory: segments processed independently (the paper's baseline)", hf=True),
    MemoryKind("memtr", "Memory Transformer: memory tokens in each segment, no recurrence", read_tokens=True,
               hf=True, without_tokens="none"),
    MemoryKind("xl", "Transformer-XL: a stop-gradient cache of memory.xl_len states per layer", xl_cache=True,
               xl_required=True),
    MemoryKind("rmt", "Recurrent Memory Transformer: read/write memory tokens, BPTT through memory",
               read_tokens=True, write_tokens=True, hf=True, without_tokens="none"),
    MemoryKind("rmt_xl", "RMT + the Transformer-XL cache", read_tokens=True, write_tokens=True, xl_cache=True,
               xl_required=True, without_tokens="xl"),
    MemoryKind("infinite", "∞-former: continuous long-term memory (plus the XL cache if memory.xl_len > 0)",
               xl_cache=True, ltm=True),
)}


def memory_kind(name: str) -> MemoryKind:
    """The kind called ``name``; ValueError naming the known kinds otherwise (never a silent ``none``)."""
    try:
        return MEMORY_KINDS[name]
    except KeyError:
        raise ValueError(f"memory.kind must be one of {', '.join(MEMORY_KINDS)}, got {name!r}") from None


def kinds_where(**properties: bool) -> tuple[str, ...]:
    """Names of the kinds with the given properties (``kinds_where(hf=True)``), table order."""
    return tuple(k.name for k in MEMORY_KINDS.values() if all(getattr(k, p) == v for p, v in properties.items()))
