"""ZeRO-3 with a recurrence: every parameter gathered once per training step, not once per segment.

What DeepSpeed 0.19.8 does (``runtime/zero/parameter_offload.py``, ``partitioned_param_coordinator.py``):
a forward pre-hook on the engine's module calls ``reset_step()`` at every call of the module. The
recurrence calls it once per segment (and again for sliding re-runs and replay), so the module trace
that ZeRO-3 records and then follows is cut at every segment, and the backward, whose modules run past
the forward-only trace, invalidates it. Without a complete trace each submodule's parameters are
gathered before each use and released after it, the persistent ones (``stage3_param_persistence_threshold``)
too, and ``stage3_max_reuse_distance``, ``stage3_max_live_parameters`` and prefetching
(``stage3_prefetch_bucket_size``) never act: measured with 2 gloo processes (``bench/zero3.py``) none of
them changed the all-gathers of a step.

:func:`trace_whole_steps` moves the reset to the first forward of each training step (a step ends with
``engine.step()`` on the accumulation boundary) and to switches between training and evaluation. The
trace then spans the whole step, forward and backward of every segment, is the same every step, and
DeepSpeed's own reuse logic keeps a parameter gathered between its uses when they are within
``stage3_max_reuse_distance`` elements (``train/engine.py`` sets 1e9): models under 1e9 parameters are
gathered once per step, and parameter memory during the step is then the whole model's, as in ZeRO-2
(gradients and optimizer state stay partitioned). A step whose module order changes (the first step of
a stream, a curriculum's new segment count, an evaluation) records the trace again; until then each use
gathers, as before.
"""

from __future__ import annotations

from typing import Any

import torch


def trace_whole_steps(engine: Any) -> bool:
    """Make ZeRO-3's parameter trace cover one training step instead of one module call (see above).
    Call once after ``deepspeed.initialize``; returns False (and does nothing) below ZeRO-3."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None:
        return False
    coordinator = offload.get_param_coordinator()
    offload.fwd_pre_hook.remove()  # DeepSpeed's reset at every call of the module
    last: list[tuple[int, bool] | None] = [None]

    def start_of_step(module: torch.nn.Module, *args: Any) -> None:
        key = (engine.global_steps, module.training)
        if key != last[0]:
            last[0] = key
            coordinator.reset_step()

    offload.fwd_pre_hook = engine.module.register_forward_pre_hook(start_of_step)
    return True
