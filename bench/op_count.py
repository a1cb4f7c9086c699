"""Aten ops per training step, counted on the CPU: a proxy for GPU kernel launches, deterministic where
timings on a shared machine are not.

    python bench/op_count.py                      # the table below, for the default tiny model
    python bench/op_count.py --layers 24 --json out.json

A ``TorchDispatchMode`` sees every aten op below autograd, forward and backward (and the optimizer
step, counted apart). Columns: ``ops`` = all of them; ``kernels`` = those that compute or move data (not
views, not allocations, not metadata: on a GPU each is roughly one launch); ``copies`` = data movement
without arithmetic (``copy_``, ``_to_copy``, ``clone``, ``cat``, ``stack``): the dtype casts of fp32
weights under autocast show here. The GPU run that filed issue 12 was host-bound (255 ms of launches for
a 156 ms step), so on such a step fewer kernels is directly less time.

Variants: every memory kind with full BPTT over the segments, rmt with sliding BPTT and with activation
checkpointing, and rmt under bf16 both ways: autocast of fp32 weights (what the benchmarks did) and bf16
weights with an fp32 master copy (DeepSpeed's bf16 mode, now ``Runner(bf16=True)``).
"""

from __future__ import annotations

import argparse
import collections
import json
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import Runner, add_model_arguments, model_config

COPIES = {"copy_", "_to_copy", "clone", "cat", "stack"}
NO_KERNEL = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach", "lift_fresh",
             "_local_scalar_dense", "set_", "resize_", "_has_compatible_shallow_copy_type", "is_same_size",
             "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_unsafe_view", "alias"}


class OpCounter(TorchDispatchMode):
    """Counts aten op calls by name (``aten.mm``) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.kinds: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        if name not in self.kinds:
            view = getattr(func, "is_view", False)
            self.kinds[name] = ("copy" if name in COPIES else "none" if view or name in NO_KERNEL
                                else "kernel")
        return func(*args, **(kwargs or {}))

    def totals(self) -> dict[str, int]:
        kernels = sum(n for name, n in self.counts.items() if self.kinds[name] != "none")
        copies = sum(n for name, n in self.counts.items() if self.kinds[name] == "copy")
        return {"ops": sum(self.counts.values()), "kernels": kernels, "copies": copies}


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str = "rmt"
    bptt_unroll: int = -1
    bptt_mode: str = "window"
    checkpointing: bool = False
    precision: str = "fp32"  # fp32 | autocast (bf16 autocast of fp32 weights) | bf16 (bf16 weights, fp32 master)


VARIANTS = (
    Variant("none", kind="none"),
    Variant("memtr", kind="memtr"),
    Variant("xl", kind="xl"),
    Variant("rmt"),
    Variant("rmt_xl", kind="rmt_xl"),
    Variant("infinite", kind="infinite", bptt_unroll=0),
    Variant("rmt sliding k=1", bptt_unroll=1, bptt_mode="sliding"),
    Variant("rmt + checkpointing", checkpointing=True),
    Variant("none bf16 autocast", kind="none", precision="autocast"),
    Variant("rmt bf16 autocast", precision="autocast"),
    Variant("none bf16 + fp32 master", kind="none", precision="bf16"),
    Variant("rmt bf16 + fp32 master", precision="bf16"),
)


def runner_for(variant: Variant, args: argparse.Namespace) -> Runner:
    cfg = model_config(kind=variant.kind, d_model=args.d_model, layers=args.layers, heads=args.heads,
                       segment_len=args.segment_len, segments=args.segments, num_tokens=args.num_tokens,
                       xl_len=args.segment_len, bptt_unroll=variant.bptt_unroll, bptt_mode=variant.bptt_mode,
                       activation_checkpointing=variant.checkpointing, ltm_basis=16)
    return Runner(cfg, batch=args.batch, vocab=args.vocab, device=torch.device("cpu"), precision=variant.precision)


def count(runner: Runner) -> dict[str, dict[str, int] | list]:
    """Op counts of the second training step (the first creates the optimizer's state)."""
    runner.step()
    with OpCounter() as model_ops:
        runner.forward_backward()
    with OpCounter() as optimizer_ops:
        runner.update()
    return {"model": model_ops.totals(), "optimizer": optimizer_ops.totals(),
            "top": [(name, n) for name, n in model_ops.counts.most_common() if model_ops.kinds[name] != "none"][:12]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, d_model=64, segment_len=32, num_tokens=4, batch=2)
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--top", action="store_true", help="also print each variant's most frequent ops")
    parser.add_argument("--json", default="", help="write the counts here")
    args = parser.parse_args()
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only.split(",")]
    print(f"torch {torch.__version__}; d_model {args.d_model}, {args.layers} layers, {args.segments} x "
          f"{args.segment_len} tokens, memory {args.num_tokens}, batch {args.batch}; one training step")
    print(f"{'variant':26s} {'ops':>7s} {'kernels':>8s} {'copies':>7s} {'per seg.':>9s} | optimizer kernels")
    results = {}
    for variant in chosen:
        result = count(runner_for(variant, args))
        results[variant.name] = result
        m = result["model"]
        print(f"{variant.name:26s} {m['ops']:7d} {m['kernels']:8d} {m['copies']:7d} "
              f"{m['kernels'] / args.segments:9.0f} | {result['optimizer']['kernels']}")
        if args.top:
            print("    " + ", ".join(f"{name} {n}" for name, n in result["top"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
