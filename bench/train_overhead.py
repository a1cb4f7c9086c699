"""Cost of the distributed path: tokens/s of Ray Train + DeepSpeed with 1 worker against a plain
PyTorch loop over the same model, data, BPTT mode and optimizer, interleaved in one run.

    python bench/train_overhead.py [--repeats 3] [--steps 40] [--threads 2] [--zero-stage 2] [--workers 1]

Both sides are timed in steady state: the plain loop after warm-up steps, the Ray path over its
second report interval (the loop's own ``tokens_per_s``, which excludes start-up, evaluation and
checkpointing). Prints each figure, the medians and the overhead ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from rmt_dist.config import Config, from_flat  # noqa: E402
from rmt_dist.data import LMStreams, load_lm_corpus  # noqa: E402
from rmt_dist.model import StreamState, build_model, stream_train_step  # noqa: E402
from rmt_dist.presets import PRESETS  # noqa: E402


def bench_config(args: argparse.Namespace, storage: str) -> Config:
    return from_flat({**PRESETS["lm_wikitext"]["smoke"], "model.d_model": 128, "model.d_ff": 512,
                      "data.segment_len": 64, "data.num_segments": 2, "train.batch_size": 8,
                      "train.max_steps": 2 * args.steps, "train.eval_interval": args.steps, "train.eval_batches": 1,
                      "train.warmup_steps": 0, "deepspeed.zero_stage": args.zero_stage,
                      "scaling.num_workers": args.workers, "scaling.cpus_per_worker": args.threads,
                      "storage.path": storage, "mlflow.enabled": False})


def plain_tokens_per_s(cfg: Config, steps: int, warmup: int = 3) -> float:
    corpus = load_lm_corpus(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, corpus.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    d = cfg.data
    windows = iter(LMStreams(corpus.train, cfg.train.batch_size, 1, 0, d.segment_len, d.num_segments))
    stream = StreamState()
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        _, stream = stream_train_step(model, stream, next(windows), bptt_unroll=cfg.memory.bptt_unroll,
                                      bptt_mode=cfg.memory.bptt_mode)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * cfg.train.batch_size * d.segment_len * d.num_segments / (time.perf_counter() - started)


def ray_tokens_per_s(cfg: Config) -> float:
    from rmt_dist.train.driver import run_training

    summary = run_training(cfg, "bench_overhead")
    return summary.metrics["tokens_per_s"] / cfg.scaling.num_workers  # per worker, as the plain loop is one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain, distributed = [], []
    with tempfile.TemporaryDirectory() as storage:
        cfg = bench_config(args, storage)
        for i in range(args.repeats):
            plain.append(plain_tokens_per_s(cfg, args.steps))
            distributed.append(ray_tokens_per_s(cfg))
            print(f"repeat {i + 1}: plain {plain[-1]:,.0f} tok/s | ray+deepspeed {distributed[-1]:,.0f} tok/s per worker",
                  flush=True)
    p, r = statistics.median(plain), statistics.median(distributed)
    print(f"median: plain {p:,.0f} tok/s, ray+deepspeed (ZeRO-{args.zero_stage}, {args.workers} worker(s), "
          f"{args.threads} threads) {r:,.0f} tok/s per worker; overhead {100 * (p / r - 1):+.1f}% "
          f"(target < 10%)")


if __name__ == "__main__":
    main()
