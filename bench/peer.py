"""The peer: training tokens/s and peak memory of rmt-dist's RMT against `recurrent-memory-transformer-pytorch`
(lucidrains, PyPI) on the same configuration, interleaved in one run.

    pip install --no-deps -r bench/requirements-peer.txt
    python bench/peer.py --segments 4,16 --repeats 3 --threads 2

Configuration (issue 7): dim 256, depth 4, 4 heads, segment 256, 16 memory tokens, batch 4, byte
vocabulary, fp32 on CPU, full BPTT over all segments; then both with memory-replay backprop. The peer
is built as a plain RMT — no XL memories, one residual stream (no hyper-connections), rotary positions,
its flash (SDPA) attention path — so both compute the same kind of model; its remaining extras (null
key/value, value residual mixing) are a few percent of its FLOPs. Targets at 16 segments, full BPTT:
ours >= 1.5x its tokens/s and <= 0.5x its peak memory. Ours also runs with ``train.recompute=elementwise``
(selective activation checkpointing; the peer has no checkpointing).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import MasterWeightAdamW, Runner, model_config, peak_step_bytes, timed

DIM, DEPTH, HEADS, SEGMENT, MEMORY, BATCH, VOCAB = 256, 4, 4, 256, 16, 4, 256
CPU = torch.device("cpu")


class PeerRunner:
    """The peer's model, AdamW and the same kind of fixed batch; ``step()`` is one training step."""

    def __init__(self, segments: int, replay: bool, device: torch.device = CPU, bf16: bool = False) -> None:
        from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer, RecurrentMemoryTransformerWrapper

        torch.manual_seed(0)
        model = RecurrentMemoryTransformer(
            DIM, num_tokens=VOCAB, depth=DEPTH, heads=HEADS, dim_head=DIM // HEADS, num_memory_tokens=MEMORY,
            seq_len=SEGMENT, use_flash_attn=True, use_xl_memories=False, num_residual_streams=1,
            abs_pos_emb=False, rotary_pos_emb=True)
        self.model = RecurrentMemoryTransformerWrapper(model).to(device)
        if bf16:  # as ours trains in bf16: bf16 weights, fp32 master weights in the optimizer
            self.model.to(torch.bfloat16)
            self.optimizer = MasterWeightAdamW(list(self.model.parameters()), lr=1e-4, fused=device.type == "cuda")
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.ids = torch.randint(0, VOCAB, (BATCH, segments * SEGMENT + 1),
                                 generator=torch.Generator().manual_seed(1)).to(device)
        self.tokens = BATCH * segments * SEGMENT
        self.replay = replay

    def step(self) -> None:
        if self.replay:
            self.model(self.ids, memory_replay_backprop=True)  # runs its own backward passes
        else:
            loss, _ = self.model(self.ids, return_loss=True)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def ours(segments: int, replay: bool, recompute: str | None = None, device: torch.device = CPU,
         bf16: bool = False) -> Runner:
    """rmt-dist's RMT; ``recompute`` turns on activation checkpointing with that policy."""
    cfg = model_config(kind="rmt", d_model=DIM, layers=DEPTH, heads=HEADS, segment_len=SEGMENT, segments=segments,
                       num_tokens=MEMORY, bptt_unroll=-1, replay=replay, activation_checkpointing=recompute is not None,
                       recompute=recompute or "all")
    return Runner(cfg, batch=BATCH, vocab=VOCAB, device=device, bf16=bf16)


def measure(segments: int, replay: bool, repeats: int, device: torch.device = CPU,
            bf16: bool = False) -> dict[str, dict[str, float]]:
    """Ours (and, without replay, ours with selective recomputation) against the peer, interleaved:
    name -> tokens_per_s (median), peak_bytes (one step's), parameters."""
    runners: dict[str, Runner | PeerRunner] = {"rmt-dist": ours(segments, replay, device=device, bf16=bf16)}
    if not replay:  # selective recomputation: the memory of checkpointing at a fraction of its time
        runners["rmt-dist recompute=elementwise"] = ours(segments, replay, "elementwise", device, bf16)
    runners["peer"] = PeerRunner(segments, replay, device, bf16)
    for runner in runners.values():
        runner.step()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(repeats):
        for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            seconds[name].append(timed(runners[name].step, 1, device))
    return {name: {"tokens_per_s": runner.tokens / statistics.median(seconds[name]),
                   "peak_bytes": peak_step_bytes(runner.step, device),
                   "parameters": sum(p.numel() for p in runner.model.parameters())}
            for name, runner in runners.items()}


def compare(segments: int, replay: bool, args: argparse.Namespace) -> None:
    results = measure(segments, replay, args.repeats)
    peer = results["peer"]
    mode = "replay" if replay else "full BPTT"
    for name, r in results.items():
        print(f"{segments:2d} segments {mode:9s} {name:30s} {r['tokens_per_s']:8,.0f} tok/s  "
              f"peak {r['peak_bytes'] / 2**20:8.1f} MiB  ({r['parameters'] / 1e6:.2f}M parameters)")
    for name, r in results.items():
        if name != "peer":
            print(f"{segments:2d} segments {mode:9s} {name} / peer: tokens/s {r['tokens_per_s'] / peer['tokens_per_s']:.2f}x, "
                  f"peak memory {r['peak_bytes'] / peer['peak_bytes']:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", default="4,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--no-replay", action="store_true", help="skip the memory-replay comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; dim {DIM}, depth {DEPTH}, {HEADS} heads, "
          f"segment {SEGMENT}, {MEMORY} memory tokens, batch {BATCH}, vocabulary {VOCAB}, fp32 CPU", flush=True)
    for replay in (False,) if args.no_replay else (False, True):
        for segments in (int(n) for n in args.segments.split(",")):
            compare(segments, replay, args)


if __name__ == "__main__":
    main()
