"""Activation checkpointing: peak memory and tokens/s of the same training step without it, recomputing
whole blocks (train.recompute=all) and recomputing only elementwise ops (train.recompute=elementwise),
interleaved in one run.

    python bench/checkpointing.py --kind rmt --segments 8 --segment-len 256 --bptt-unroll -1 --repeats 3 --threads 2

``all`` keeps only each block's input and recomputes the block in backward: memory should fall to a
fraction, time rise by about one forward pass (~1.3x). ``elementwise`` keeps the matmul and attention
outputs and recomputes norms, GELU and rotary: part of the memory saving for a small part of the time.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from rmt_dist.memory_kinds import MEMORY_KINDS

from common import Runner, model_config

MODES = ("off", "all", "elementwise")  # no checkpointing, then train.recompute's values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="rmt", choices=tuple(MEMORY_KINDS))
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--segment-len", type=int, default=256)
    parser.add_argument("--num-tokens", type=int, default=16)
    parser.add_argument("--xl-len", type=int, default=0)
    parser.add_argument("--bptt-unroll", type=int, default=-1)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 weights, fp32 master weights in the optimizer (DeepSpeed's bf16 mode; common.Runner)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runners = {}
    for mode in MODES:
        cfg = model_config(kind=args.kind, d_model=args.d_model, layers=args.layers, heads=args.heads,
                           segment_len=args.segment_len, segments=args.segments, num_tokens=args.num_tokens,
                           xl_len=args.xl_len, bptt_unroll=args.bptt_unroll, activation_checkpointing=mode != "off",
                           recompute="all" if mode == "off" else mode)
        runners[mode] = Runner(cfg, batch=args.batch, vocab=args.vocab, device=device, bf16=args.bf16)
    print(f"device {device}, {torch.get_num_threads()} threads; {args.kind}, d_model {args.d_model}, {args.layers} "
          f"layers, batch {args.batch}, {args.segments} x {args.segment_len} tokens, BPTT {args.bptt_unroll}", flush=True)
    for runner in runners.values():
        runner.step()
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(args.repeats):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            seconds[mode].append(runners[mode].seconds(1))
    peaks = {mode: runner.peak_bytes() for mode, runner in runners.items()}
    for mode, runner in runners.items():
        t = statistics.median(seconds[mode])
        print(f"{mode:11s} {runner.tokens / t:9,.0f} tok/s  peak {peaks[mode] / 2**20:8.1f} MiB")
    for mode in MODES[1:]:
        print(f"{mode}/off: step time {statistics.median(seconds[mode]) / statistics.median(seconds['off']):.2f}x, "
              f"peak memory {peaks[mode] / peaks['off']:.2f}x")


if __name__ == "__main__":
    main()
