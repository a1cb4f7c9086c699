"""Activation checkpointing: peak memory and tokens/s of the same training step with and without it,
interleaved in one run.

    python bench/checkpointing.py --kind rmt --segments 8 --segment-len 256 --bptt-unroll -1 --repeats 3 --threads 2

Checkpointing keeps only each block's input and recomputes the block in backward: memory should fall
to a fraction (about 1 / activations-per-block), time rise by about one forward pass (~1.3x).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import Runner, model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="rmt", choices=("none", "memtr", "xl", "rmt", "rmt_xl", "infinite"))
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
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runners = {
        checkpointing: Runner(model_config(kind=args.kind, d_model=args.d_model, layers=args.layers, heads=args.heads,
                                           segment_len=args.segment_len, segments=args.segments,
                                           num_tokens=args.num_tokens, xl_len=args.xl_len, bptt_unroll=args.bptt_unroll,
                                           activation_checkpointing=checkpointing),
                              batch=args.batch, vocab=args.vocab, device=device, bf16=args.bf16)
        for checkpointing in (False, True)
    }
    print(f"device {device}, {torch.get_num_threads()} threads; {args.kind}, d_model {args.d_model}, {args.layers} "
          f"layers, batch {args.batch}, {args.segments} x {args.segment_len} tokens, BPTT {args.bptt_unroll}", flush=True)
    for runner in runners.values():
        runner.step()
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.repeats):
        for checkpointing in ((False, True) if r % 2 == 0 else (True, False)):
            seconds[checkpointing].append(runners[checkpointing].seconds(1))
    peaks = {checkpointing: runner.peak_bytes() for checkpointing, runner in runners.items()}
    for checkpointing, runner in runners.items():
        t = statistics.median(seconds[checkpointing])
        print(f"checkpointing {'on ' if checkpointing else 'off'}: {runner.tokens / t:9,.0f} tok/s  "
              f"peak {peaks[checkpointing] / 2**20:8.1f} MiB")
    print(f"on/off: step time {statistics.median(seconds[True]) / statistics.median(seconds[False]):.2f}x, "
          f"peak memory {peaks[True] / peaks[False]:.2f}x")


if __name__ == "__main__":
    main()
