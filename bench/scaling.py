"""Scaling with length: tokens/s and peak memory of one training step as the number of segments grows,
at a fixed segment size, for rmt (BPTT unroll 0, 2, full, full with replay), infinite (∞-former) and a
full-attention transformer of the same size over the whole length.

    python bench/scaling.py --segments 2,4,8,16,32,64 --segment-len 128 --batch 2 --repeats 3 \\
        --threads 2 --out bench/results

Every length runs all variants interleaved (so the machine's drift hits them alike); each figure is
the median of ``--repeats`` timed steps after a warm-up step, and peak memory is what one extra step
allocates above the resident parameters and AdamW state (``common.peak_step_bytes``). A variant stops
growing once a step takes longer than ``--max-step-s`` or runs out of memory. Prints a table, the
ratios longest/shortest per variant, writes ``scaling.json`` and ``scaling.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from common import Runner, model_config


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str
    bptt_unroll: int = -1
    replay: bool = False
    full_attention: bool = False  # one segment over the whole length


VARIANTS = (
    Variant("rmt k=0", "rmt", bptt_unroll=0),
    Variant("rmt k=2", "rmt", bptt_unroll=2),
    Variant("rmt full BPTT", "rmt", bptt_unroll=-1),
    Variant("rmt full BPTT + replay", "rmt", bptt_unroll=-1, replay=True),
    Variant("infinite", "infinite", bptt_unroll=0),
    Variant("full attention", "none", full_attention=True),
)


def runner_for(variant: Variant, segments: int, args: argparse.Namespace, device: torch.device) -> Runner:
    segment_len, count = ((segments * args.segment_len, 1) if variant.full_attention else (args.segment_len, segments))
    cfg = model_config(kind=variant.kind, d_model=args.d_model, layers=args.layers, heads=args.heads,
                       segment_len=segment_len, segments=count, num_tokens=args.num_tokens,
                       bptt_unroll=variant.bptt_unroll, bptt_mode=args.bptt_mode, replay=variant.replay,
                       activation_checkpointing=args.activation_checkpointing, ltm_basis=args.ltm_basis)
    return Runner(cfg, batch=args.batch, vocab=args.vocab, device=device, bf16=args.bf16)


def measure(runner: Runner, repeats: int) -> tuple[float, int]:
    """(median tokens/s, peak bytes) of one step, after a warm-up step."""
    runner.step()
    seconds = [runner.seconds(1) for _ in range(repeats)]
    return runner.tokens / statistics.median(seconds), runner.peak_bytes()


def plot(results: dict[str, dict[int, dict]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, by_length in results.items():
        lengths = sorted(by_length)
        speed.plot(lengths, [by_length[n]["tokens_per_s"] for n in lengths], marker="o", label=name)
        memory.plot(lengths, [by_length[n]["peak_bytes"] / 2**20 for n in lengths], marker="o", label=name)
    for axis, label in ((speed, "training tokens/s"), (memory, "peak step memory (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel(f"segments of {args.segment_len} tokens")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    speed.set_ylim(bottom=0)
    memory.set_yscale("log", base=2)
    speed.legend(fontsize=8)
    fig.suptitle(f"d_model {args.d_model}, {args.layers} layers, batch {args.batch}, "
                 f"{args.num_tokens} memory tokens, {torch.get_num_threads()} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", default="2,4,8,16,32,64", help="comma-separated segment counts")
    parser.add_argument("--segment-len", type=int, default=128)
    parser.add_argument("--num-tokens", type=int, default=16, help="rmt memory tokens")
    parser.add_argument("--ltm-basis", type=int, default=64, help="infinite: basis functions per layer")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256, help="byte-level, as enwik8")
    parser.add_argument("--bptt-mode", default="window", choices=("window", "sliding"))
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                        help="comma-separated subset of: " + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-step-s", type=float, default=60.0, help="stop a variant once a step is slower")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 weights, fp32 master weights in the optimizer (DeepSpeed's bf16 mode; common.Runner)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lengths = sorted(int(n) for n in args.segments.split(","))
    wanted = set(args.variants.split(","))
    variants = [v for v in VARIANTS if v.name in wanted]
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; d_model {args.d_model}, "
          f"{args.layers} layers, {args.heads} heads, batch {args.batch}, segment {args.segment_len}, "
          f"{args.num_tokens} memory tokens, BPTT mode {args.bptt_mode}", flush=True)
    results: dict[str, dict[int, dict]] = {v.name: {} for v in variants}
    stopped: dict[str, str] = {}
    for n in lengths:
        for variant in variants:
            if variant.name in stopped:
                continue
            try:
                tokens_per_s, peak = measure(runner_for(variant, n, args, device), args.repeats)
            except (torch.OutOfMemoryError, MemoryError) as error:
                stopped[variant.name] = f"out of memory at {n} segments ({type(error).__name__})"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            results[variant.name][n] = {"tokens_per_s": tokens_per_s, "peak_bytes": peak}
            print(f"{n:3d} segments  {variant.name:24s} {tokens_per_s:10,.0f} tok/s  peak {peak / 2**20:9.1f} MiB",
                  flush=True)
            if n * args.segment_len * args.batch / tokens_per_s > args.max_step_s:
                stopped[variant.name] = f"stopped after {n} segments (a step took over {args.max_step_s:.0f} s)"
    print("\nlongest / shortest length measured, per variant:")
    for name, by_length in results.items():
        if len(by_length) < 2:
            continue
        lo, hi = min(by_length), max(by_length)
        speed = by_length[hi]["tokens_per_s"] / by_length[lo]["tokens_per_s"]
        memory = by_length[hi]["peak_bytes"] / max(by_length[lo]["peak_bytes"], 1)
        print(f"  {name:24s} {hi}/{lo} segments: tokens/s {speed:.2f}x, peak memory {memory:.2f}x"
              + (f"  ({stopped[name]})" if name in stopped else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps({"args": vars(args), "results": results, "stopped": stopped},
                                                 indent=1))
    plot(results, args, out / "scaling.png")
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")


if __name__ == "__main__":
    main()
