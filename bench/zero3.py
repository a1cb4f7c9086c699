"""ZeRO-3 against ZeRO-2 with the recurrence: step time and parameter all-gathers per training step, with 2
gloo processes on the CPU (no Ray: ``torch.multiprocessing`` spawn, ``torch.distributed`` gloo,
``deepspeed.initialize(dist_init_required=False)``, ``DS_ACCELERATOR=cpu``).

    python bench/zero3.py --segments 4 --repeats 5

Each rank builds one engine per variant (same model, same data), then the repeats alternate the
variants. Variants: ``zero2``; ``zero3`` (``rmt_dist.train.engine.deepspeed_config``: its stage-3 settings
are DeepSpeed's defaults, stated); ``zero3 + step trace`` (the same, with
``rmt_dist.train.zero3.trace_whole_steps``). Counted on rank 0 over one step after two warm-up steps:
all-gather calls and the elements they gathered, divided by the model's parameter count ("whole-model
gathers per step"); then one more step's loss, the same for every variant (same weights, same data). The
issue's GPU figure: ZeRO-3 was 3.1x ZeRO-2's step time on one H200; target <= 1.25x. Other stage-3
settings can be tried alongside: ``ZERO3_TRY="big-reuse:stage3_max_reuse_distance=1e12;persist:
stage3_param_persistence_threshold=1e9" python bench/zero3.py``.

Why the counts look as they do: see ``rmt_dist/train/zero3.py`` (DeepSpeed resets its parameter trace at
every call of the module, i.e. every segment, so without ``trace_whole_steps`` every use of a submodule
gathers its parameters and none of the stage-3 settings acts; with it each parameter is gathered once
per step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rmt_dist.config import Config  # noqa: E402

from common import add_model_arguments, model_config  # noqa: E402

class GatherCounter:
    """Wraps torch.distributed's all-gather entry points (before DeepSpeed captures them): calls and elements."""

    NAMES = ("all_gather_into_tensor", "all_gather", "_all_gather_base", "all_gather_coalesced")

    def __init__(self) -> None:
        self.calls = self.numel = 0
        self.active = False
        for name in self.NAMES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            if self.active:  # the output (a tensor or a list of them) comes first, by position or keyword
                out = args[0] if args else kwargs.get("output_tensor", kwargs.get("tensor_list", ()))
                self.calls += 1
                self.numel += sum(t.numel() for t in (out if isinstance(out, (list, tuple)) else [out])
                                  if torch.is_tensor(t))
            return fn(*args, **kwargs)
        return counted


def variants(cfg: Config) -> dict[str, dict]:
    """name -> the DeepSpeed config of that variant ("+ step trace": with ``zero3.trace_whole_steps``).
    ``ZERO3_TRY="name:stage3_key=value,...;..."`` adds ZeRO-3 variants with those settings."""
    from rmt_dist.train.engine import deepspeed_config

    cfg.deepspeed.zero_stage = 2
    zero2 = deepspeed_config(cfg)
    cfg.deepspeed.zero_stage = 3
    zero3 = deepspeed_config(cfg)
    out = {"zero2": zero2, "zero3": zero3, "zero3 + step trace": zero3}
    for spec in filter(None, os.environ.get("ZERO3_TRY", "").split(";")):
        name, _, pairs = spec.partition(":")
        out[name] = json.loads(json.dumps(zero3))
        out[name]["zero_optimization"].update({k: int(float(v)) for k, v in (p.split("=") for p in pairs.split(","))})
    return out


def worker(rank: int, args: argparse.Namespace, port: int, results: dict) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    counter = GatherCounter()
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import deepspeed

    from rmt_dist.model import build_model, split_segments, train_segments
    from rmt_dist.train.engine import micro_step
    from rmt_dist.train.zero3 import trace_whole_steps

    cfg = model_config(kind="rmt", d_model=args.d_model, layers=args.layers, heads=args.heads,
                       segment_len=args.segment_len, segments=args.segments, num_tokens=args.num_tokens,
                       bptt_unroll=args.bptt_unroll, bptt_mode=args.bptt_mode,
                       activation_checkpointing=args.activation_checkpointing)
    cfg.train.batch_size, cfg.train.grad_clip = args.batch, 1.0
    ids = torch.randint(0, args.vocab, (args.batch, args.segments * args.segment_len + 1),
                        generator=torch.Generator().manual_seed(1 + rank))
    segments = split_segments(ids[:, :-1], ids[:, 1:], args.segment_len)
    engines, n_params = {}, 0
    linear = {"zero2": torch.nn.functional.linear}  # ZeRO-3 swaps in its own linear for the whole process
    for name, ds_config in variants(cfg).items():
        torch.manual_seed(0)
        model = build_model(cfg, args.vocab)
        n_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engines[name], *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                 dist_init_required=False)
        if "step trace" in name:
            trace_whole_steps(engines[name])
    linear["zero3"] = torch.nn.functional.linear

    def step(engine) -> float:
        torch.nn.functional.linear = linear["zero3" if engine.zero_optimization_stage() == 3 else "zero2"]
        mem = cfg.memory
        stats = train_segments(engine, segments, bptt_unroll=mem.bptt_unroll, bptt_mode=mem.bptt_mode,
                               backward=lambda loss: micro_step(engine, loss))
        return float(stats.loss_sum / stats.n_tokens)

    gathers = {}
    for name, engine in engines.items():
        step(engine)  # warm-up (and the trace DeepSpeed records)
        step(engine)
        counter.calls = counter.numel = 0
        counter.active = True
        step(engine)
        counter.active = False
        gathers[name] = {"calls": counter.calls, "model_gathers": counter.numel / n_params}
    losses = {}  # every variant has taken the same steps from the same weights on the same data
    for name, engine in engines.items():
        losses[name] = step(engine)
    seconds = {name: [] for name in engines}
    for r in range(args.repeats):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            dist.barrier()
            start = time.perf_counter()
            step(engines[name])
            dist.barrier()
            seconds[name].append(time.perf_counter() - start)
    if rank == 0:
        results.update(n_params=n_params, gathers=gathers, seconds=seconds, losses=losses)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, d_model=128, segment_len=64, segments=4, num_tokens=8, batch=2)
    parser.add_argument("--bptt-unroll", type=int, default=-1)
    parser.add_argument("--bptt-mode", default="window", choices=("window", "sliding"))
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", default="", help="write the figures here")
    args = parser.parse_args()
    with mp.Manager() as manager:
        results = manager.dict()
        port = 29500 + os.getpid() % 1000
        mp.spawn(worker, args=(args, port, results), nprocs=2, join=True)
        results = dict(results)
    print(f"2 gloo processes x {args.threads} thread(s); rmt, d_model {args.d_model}, {args.layers} layers, "
          f"{args.segments} x {args.segment_len} tokens, batch {args.batch}, BPTT {args.bptt_unroll} {args.bptt_mode}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}; "
          f"{results['n_params'] / 1e6:.2f}M parameters")
    base = statistics.median(results["seconds"]["zero2"])
    for name, times in results["seconds"].items():
        g = results["gathers"][name]
        print(f"{name:18s} {statistics.median(times) * 1000:8.1f} ms/step  {statistics.median(times) / base:5.2f}x zero2  "
              f"all-gathers/step {g['calls']:5d}  whole-model gathers/step {g['model_gathers']:5.2f}  "
              f"4th step loss {results['losses'][name]:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=1))


if __name__ == "__main__":
    main()
