"""Cost of memory: tokens/s and peak memory of one training step (forward, backward, AdamW step) of a
memory kind against ``none`` on the same tokens, same model size, in the same run.

    python bench/model_step.py --kind rmt --segment-len 512 --num-tokens 10 --segments 2 \\
        --d-model 256 --layers 4 --heads 4 --batch 4 --repeats 5 --threads 2

With ``--compile`` the same kind runs eager against ``train.compile`` (each block compiled; the warm-up
step pays the compilation) instead of against ``none``.

Repeats alternate the two kinds (and which goes first) so drift and neighbours' load hit both; the
figures are medians (and the ratio of the fastest repeats, the least disturbed on a shared machine).
Peak memory is what the step allocates above what was resident before it (parameters and AdamW
state): on CUDA ``torch.cuda.max_memory_allocated``, on CPU the running total of the allocator's
events that ``torch.profiler`` records (``profile_memory=True``), measured in one separate, untimed
step. The issue's target: at segment 512 with 10 memory tokens, rmt costs at most
1.15x none.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from rmt_dist.memory_kinds import MEMORY_KINDS

from common import Runner, model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="rmt", choices=tuple(MEMORY_KINDS))
    parser.add_argument("--segment-len", type=int, default=512)
    parser.add_argument("--num-tokens", type=int, default=10)
    parser.add_argument("--xl-len", type=int, default=0, help="XL cache per layer (xl, rmt_xl); 0 = segment length")
    parser.add_argument("--segments", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256, help="byte-level, as enwik8")
    parser.add_argument("--bptt-unroll", type=int, default=-1)
    parser.add_argument("--bptt-mode", default="window", choices=("window", "sliding"))
    parser.add_argument("--replay", action="store_true", help="memory-replay backprop (needs --bptt-unroll -1)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="compare --kind eager against train.compile "
                        "(instead of against none); the warm-up step compiles")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per repeat and kind")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 weights, fp32 master weights in the optimizer (DeepSpeed's bf16 mode; common.Runner)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.xl_len = args.xl_len or args.segment_len
    device = torch.device(args.device)
    # name -> (memory kind, train.compile): the kind against none, or (--compile) eager against compiled
    variants = ({args.kind: (args.kind, False), f"{args.kind} compiled": (args.kind, True)} if args.compile
                else {args.kind: (args.kind, False), "none": ("none", False)} if args.kind != "none"
                else {"none": ("none", False)})
    kinds = list(variants)
    runners = {
        name: Runner(model_config(kind=kind, d_model=args.d_model, layers=args.layers, heads=args.heads,
                                  segment_len=args.segment_len, segments=args.segments, num_tokens=args.num_tokens,
                                  xl_len=args.xl_len, bptt_unroll=args.bptt_unroll, bptt_mode=args.bptt_mode,
                                  replay=args.replay, activation_checkpointing=args.activation_checkpointing,
                                  compile_blocks=compiled),
                     batch=args.batch, vocab=args.vocab, device=device, bf16=args.bf16)
        for name, (kind, compiled) in variants.items()
    }
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"d_model {args.d_model}, {args.layers} layers, {args.heads} heads, batch {args.batch}, "
          f"{args.segments} x {args.segment_len} tokens, memory {args.num_tokens}, "
          f"BPTT {args.bptt_unroll} {args.bptt_mode}{' replay' if args.replay else ''}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}", flush=True)
    for runner in runners.values():  # warm-up: allocator, AdamW state, kernels
        runner.step()
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(args.repeats):
        order = kinds if r % 2 == 0 else kinds[::-1]
        for kind in order:
            times[kind].append(runners[kind].seconds(args.steps))
        print(f"repeat {r + 1}: " + " | ".join(f"{k} {runners[k].tokens / times[k][-1]:,.0f} tok/s" for k in kinds),
              flush=True)
    peaks = {kind: runners[kind].peak_bytes() for kind in kinds}
    for kind in kinds:
        t = statistics.median(times[kind])
        print(f"{kind:12s} median {t * 1000:8.1f} ms/step  {runners[kind].tokens / t:10,.0f} tok/s  "
              f"peak {peaks[kind] / 2**20:8.1f} MiB above {runners[kind].resident_bytes() / 2**20:.1f} MiB resident")
    if len(kinds) == 2:
        first, second = kinds
        ratio = statistics.median(times[first]) / statistics.median(times[second])
        per_repeat = [a / b for a, b in zip(times[first], times[second])]
        best = min(times[first]) / min(times[second])  # the least disturbed repeats, on a shared machine
        memory = peaks[first] / max(peaks[second], 1)
        print(f"{first}/{second} step time: {ratio:.3f}x median (best-of {best:.3f}x, per repeat "
              f"{min(per_repeat):.3f}-{max(per_repeat):.3f}), peak memory {memory:.3f}x")

if __name__ == "__main__":
    main()
