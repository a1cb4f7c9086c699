"""The GPU suite: one command that checks and times what issue 12 asks on one GPU, writes one JSON and prints
one table. Needs only torch, deepspeed and transformers (no Ray, no MLflow); the peer section also needs
``recurrent-memory-transformer-pytorch`` (``bench/requirements-peer.txt``) and is skipped without it.

    python bench/gpu_suite.py --out gpu_suite.json            # one H100/H200: under 6 minutes
    python bench/gpu_suite.py --smoke --out smoke.json        # every section tiny, on the CPU, ~1 minute

Sections (a variant that fails is reported with its error line; the rest go on):
- ``kinds``: every memory kind, one training step's loss and gradients on the device in float64 and with
  bf16 weights, against float64 on the CPU (relative errors).
- ``hf``: GPT-2 and Llama built locally (random weights, nothing from the hub) with rmt memory: forward,
  backward and generation on the device in bf16; loss against the CPU in fp32.
- ``training``: the issue's model (d 1024, 24 layers, 16 heads, vocabulary 50,257, 2 segments of 512,
  10 memory tokens, batch 16, full BPTT) through the DeepSpeed engine at world size 1 (``torch.distributed``
  on nccl, ``dist_init_required=False``), bf16 weights with fp32 master weights: none, rmt, rmt +
  activation checkpointing (ZeRO-2) and rmt ZeRO-3 (with ``train/zero3.py``'s whole-step trace), each eager
  and with ``train.compile``: tokens/s, MFU (FLOPs counted by ``train/flops.py``), peak memory allocated
  and reserved. Targets: rmt >= 40% MFU, none >= 45%; rmt/none <= 1.15x; ZeRO-3 <= 1.25x ZeRO-2;
  checkpointing <= 1.35x.
- ``peer``: ``bench/peer.py`` on the device in bf16, 4 and 16 segments, full BPTT (targets at 16: >= 1.5x
  the peer's tokens/s at <= 0.6x its peak memory).
- ``scaling``: ``bench/scaling.py``'s variants against full attention, 2 to 64 segments of 128.

On the lent H200 through the device tool (it has Python 3.12, torch 2.11 + CUDA 13, transformers 5.17 and
no network; DeepSpeed and its pydantic/hjson dependencies, transformers 5.24 and the peer travel as
wheels). Here, once, in the repository root::

    echo /.whl/ >> .git/info/exclude     # already in .gitignore
    bash bench/gpu_suite.sh prepare       # builds the DeepSpeed wheel (DS_BUILD_OPS=0), downloads the rest

then one ``run`` call of the device tool with ``carry: [".whl"]``, ``timeout_s: 560`` and the command::

    bash bench/gpu_suite.sh

which installs the wheels into /tmp/site and runs this suite; ``$OUT/gpu_suite.json`` and
``$OUT/gpu_suite.log`` come back. ``bash bench/gpu_suite.sh --sections training`` runs one section.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rmt_dist.config import Config, from_flat, validate  # noqa: E402
from rmt_dist.memory_kinds import MEMORY_KINDS  # noqa: E402
from rmt_dist.model import build_model, forward_segments, split_segments, train_segments  # noqa: E402
from rmt_dist.model.backbone import apply_compile  # noqa: E402
from rmt_dist.train import flops  # noqa: E402
from rmt_dist.train.metrics import peak_mem_bytes  # noqa: E402

SECTIONS = ("kinds", "hf", "training", "peer", "scaling")

# (GPU, smoke) sizes of each section
KINDS_SIZE = dict(d=64, layers=2, heads=4, segment=32, segments=3, batch=2, memory=4, vocab=97)
TRAINING = {False: dict(d=1024, layers=24, heads=16, vocab=50257, segment=512, segments=2, memory=10, batch=16,
                        warmup=3, steps=5),
            True: dict(d=64, layers=2, heads=4, vocab=256, segment=32, segments=2, memory=4, batch=2,
                       warmup=1, steps=2)}
SCALING = {False: dict(segments=(2, 8, 32, 64), segment_len=128, d_model=256, layers=4, heads=4, batch=2,
                       variants=("rmt k=2", "rmt full BPTT", "rmt full BPTT + replay", "infinite", "full attention")),
           True: dict(segments=(2, 4), segment_len=16, d_model=32, layers=2, heads=4, batch=2,
                      variants=("rmt full BPTT", "full attention"))}


def error_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]


def attempt(name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One variant: its figures, or its error line (and the rest go on)."""
    start = time.perf_counter()
    try:
        row = {"name": name, **run()}
    except Exception as error:  # noqa: BLE001 - reported, not raised: the suite goes on
        traceback.print_exc()
        row = {"name": name, "error": error_line(error)}
    row["seconds"] = round(time.perf_counter() - start, 2)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"  {format_row(row)}", flush=True)
    return row


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (a on any device)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def tiny_config(kind: str, **train: Any) -> Config:
    s = KINDS_SIZE
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff = s["d"], s["layers"], s["heads"], 4 * s["d"]
    cfg.memory.kind, cfg.memory.num_tokens, cfg.memory.xl_len, cfg.memory.ltm_basis = kind, s["memory"], 16, 16
    cfg.memory.aux_loss_weight = 0.01 if kind == "rmt_xl" else 0.0
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return validate(cfg)


# ---------------------------------------------------------------------------------------------------- kinds
def kind_numerics(kind: str, device: torch.device) -> dict[str, Any]:
    """A full-BPTT step's loss and gradients: device float64 and device bf16 weights against CPU float64."""
    s = KINDS_SIZE
    torch.manual_seed(0)
    reference = build_model(tiny_config(kind), s["vocab"]).double()
    ids = torch.randint(0, s["vocab"], (s["batch"], s["segments"] * s["segment"] + 1))

    def step(model: torch.nn.Module, on: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        segments = split_segments(ids[:, :-1].to(on), ids[:, 1:].to(on), s["segment"])
        stats = train_segments(model, segments, bptt_unroll=-1)
        grads = torch.cat([p.grad.reshape(-1).double().cpu() for p in model.parameters() if p.grad is not None])
        return (stats.loss_sum / stats.n_tokens).double().cpu(), grads

    loss_ref, grad_ref = step(reference, torch.device("cpu"))
    out: dict[str, Any] = {"loss": float(loss_ref)}
    for name, dtype in (("fp64", torch.float64), ("bf16", torch.bfloat16)):
        model = build_model(tiny_config(kind), s["vocab"])
        model.load_state_dict(reference.state_dict())
        model.to(device=device, dtype=dtype)
        loss, grad = step(model, device)
        out[f"loss_rel_err_{name}"] = relative(loss, loss_ref)
        out[f"grad_rel_err_{name}"] = relative(grad, grad_ref)
    return out


def section_kinds(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    return [attempt(kind, lambda kind=kind: kind_numerics(kind, device)) for kind in MEMORY_KINDS]


# ------------------------------------------------------------------------------------------------------- hf
def hf_directory(which: str, root: Path) -> str:
    """A tiny causal LM with random weights, saved where ``model.hf_name_or_path`` can load it."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if which == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    path = root / which
    model.save_pretrained(path)
    return str(path)


def hf_checks(path: str, device: torch.device) -> dict[str, Any]:
    import rmt_dist

    cfg = validate(from_flat({"model.backbone": "hf", "model.hf_name_or_path": path, "memory.kind": "rmt",
                              "memory.num_tokens": 4}))
    cpu_model = build_model(cfg)
    ids = torch.randint(1, 320, (2, 3 * 16 + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs, _ = forward_segments(cpu_model, split_segments(ids[:, :-1], ids[:, 1:], 16))
        cpu_loss = sum(o.loss_sum for o in outputs) / sum(o.n_tokens for o in outputs)
    model = build_model(cfg)
    model.load_state_dict(cpu_model.state_dict())
    model.to(device=device, dtype=torch.bfloat16)
    segments = split_segments(ids[:, :-1].to(device), ids[:, 1:].to(device), 16)
    out: dict[str, Any] = {}
    start = time.perf_counter()
    with torch.no_grad():
        outputs, _ = forward_segments(model, segments)
    synchronize(device)
    out["forward_s"] = time.perf_counter() - start
    loss = sum(o.loss_sum for o in outputs) / sum(o.n_tokens for o in outputs)
    out["loss_rel_err_bf16"] = relative(loss, cpu_loss)
    start = time.perf_counter()
    train_segments(model, segments, bptt_unroll=1, bptt_mode="sliding")
    synchronize(device)
    out["backward_s"] = time.perf_counter() - start
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    out["grads_finite"] = float(all(bool(torch.isfinite(g).all()) for g in grads))
    start = time.perf_counter()
    generated = rmt_dist.generate(model, ids[:, :20].to(device), segment_len=16, max_new_tokens=8)
    synchronize(device)
    out["generate_s"] = time.perf_counter() - start
    out["generated_tokens"] = generated.shape[1] - 20
    return out


def section_hf(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for which in ("gpt2", "llama"):
            rows.append(attempt(f"{which} rmt", lambda which=which: hf_checks(hf_directory(which, Path(tmp)), device)))
        return rows


# -------------------------------------------------------------------------------------------------- training
@contextlib.contextmanager
def process_group(device: torch.device):
    """``torch.distributed`` at world size 1 (nccl on CUDA, gloo on CPU), as DeepSpeed's engine needs it."""
    import torch.distributed as dist

    port = str(29500 + os.getpid() % 2000)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def training_config(kind: str, size: dict[str, int], device: torch.device, *, stage: int,
                    checkpointing: bool, compiled: bool) -> Config:
    cfg = Config()
    m = cfg.model
    m.d_model, m.n_layers, m.n_heads, m.d_ff, m.dropout = size["d"], size["layers"], size["heads"], 4 * size["d"], 0.0
    cfg.memory.kind, cfg.memory.num_tokens, cfg.memory.bptt_unroll = kind, size["memory"], -1
    cfg.data.segment_len, cfg.data.num_segments = size["segment"], size["segments"]
    cfg.train.batch_size, cfg.train.activation_checkpointing = size["batch"], checkpointing
    cfg.train.compile = compiled  # validated as the loop would; applied below with --compile-backend
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.lr_schedule = 1e-4, 0, "constant"
    cfg.deepspeed.zero_stage = stage
    cfg.deepspeed.precision = "bf16" if device.type == "cuda" else "fp32"
    cfg.scaling.use_gpu = device.type == "cuda"
    return validate(cfg)


def training_variant(kind: str, stage: int, checkpointing: bool, compiled: bool, args: argparse.Namespace,
                     device: torch.device, peak: float | None) -> dict[str, Any]:
    from rmt_dist.train.engine import build_engine, micro_step
    from rmt_dist.train.zero3 import trace_whole_steps

    size = TRAINING[args.smoke]
    cfg = training_config(kind, size, device, stage=stage, checkpointing=checkpointing, compiled=compiled)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=False)), size["vocab"])
    step_flops = flops.step_flops(model, cfg)
    if compiled:
        torch._dynamo.reset()  # a static compile per variant, not dynamic shapes learnt from the previous one
        apply_compile(model.backbone, backend=args.compile_backend)
    model.to(device)
    engine = build_engine(model, cfg)
    if stage == 3:
        trace_whole_steps(engine)
    ids = torch.randint(0, size["vocab"], (size["batch"], size["segments"] * size["segment"] + 1),
                        generator=torch.Generator().manual_seed(1))
    segments = split_segments(ids[:, :-1].to(device), ids[:, 1:].to(device), size["segment"])

    def step() -> torch.Tensor:
        stats = train_segments(engine, segments, bptt_unroll=-1, backward=lambda loss: micro_step(engine, loss))
        return stats.loss_sum / stats.n_tokens

    start = time.perf_counter()
    for _ in range(size["warmup"]):
        loss = step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(size["steps"]):
        synchronize(device)
        start = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = size["batch"] * size["segments"] * size["segment"]
    out = {"tokens_per_s": tokens / seconds, "step_ms": 1000 * seconds, "warmup_s": warmup_s,
           "loss": float(loss), "tflop_per_step": step_flops / 1e12,
           "mfu": flops.mfu(step_flops, 1, seconds, peak) if peak else None,
           "peak_allocated_gib": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                  else peak_mem_bytes(device)) / 2**30,
           "peak_reserved_gib": (torch.cuda.max_memory_reserved(device) if device.type == "cuda"
                                 else peak_mem_bytes(device)) / 2**30}
    if hasattr(engine, "destroy"):
        engine.destroy()
    return out


TRAINING_VARIANTS = (  # name, memory kind, ZeRO stage, activation checkpointing
    ("none", "none", 2, False), ("rmt", "rmt", 2, False), ("rmt + checkpointing", "rmt", 2, True),
    ("rmt ZeRO-3", "rmt", 3, False),
)


@contextlib.contextmanager
def restored_linear():
    """DeepSpeed's ZeRO-3 replaces ``torch.nn.functional.linear`` for the whole process (``zero3_linear_wrap``,
    its memory-efficient linear) and leaves it so: every later variant and section would run through it."""
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear


def section_training(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    peak = args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops(device)
    rows = []
    with process_group(device):
        for compiled in (False, True):
            for name, kind, stage, checkpointing in TRAINING_VARIANTS:
                label = name + (" compiled" if compiled else "")
                with restored_linear():
                    rows.append(attempt(label, lambda: training_variant(kind, stage, checkpointing, compiled, args,
                                                                        device, peak)))
    return rows


# ------------------------------------------------------------------------------------------------------ peer
def section_peer(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    try:
        import recurrent_memory_transformer_pytorch  # noqa: F401
    except ImportError as error:
        return [{"name": "peer", "skipped": error_line(error)}]
    import peer

    if args.smoke:  # the same comparison, tiny (peer.py reads its sizes from these globals)
        peer.DIM, peer.DEPTH, peer.SEGMENT, peer.MEMORY, peer.BATCH = 32, 2, 16, 4, 2
    rows = []
    for segments in ((2,) if args.smoke else (4, 16)):
        def run(segments: int = segments) -> dict[str, Any]:
            results = peer.measure(segments, replay=False, repeats=1 if args.smoke else 3, device=device,
                                   bf16=device.type == "cuda")
            theirs = results["peer"]
            out = {"peer_tokens_per_s": theirs["tokens_per_s"], "peer_peak_gib": theirs["peak_bytes"] / 2**30}
            for name, key in (("rmt-dist", "ours"), ("rmt-dist recompute=elementwise", "ours_elementwise")):
                out[f"{key}_tokens_per_s"] = results[name]["tokens_per_s"]
                out[f"{key}_speed_x"] = results[name]["tokens_per_s"] / theirs["tokens_per_s"]
                out[f"{key}_memory_x"] = results[name]["peak_bytes"] / max(theirs["peak_bytes"], 1)
            return out
        rows.append(attempt(f"{segments} segments full BPTT", run))
    return rows


# --------------------------------------------------------------------------------------------------- scaling
def section_scaling(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    import scaling

    size = SCALING[args.smoke]
    options = argparse.Namespace(d_model=size["d_model"], layers=size["layers"], heads=size["heads"],
                                 segment_len=size["segment_len"], num_tokens=16 if not args.smoke else 4,
                                 bptt_mode="window", activation_checkpointing=False, ltm_basis=64 if not args.smoke else 8,
                                 batch=size["batch"], vocab=256, bf16=device.type == "cuda")
    rows = []
    for variant in (v for v in scaling.VARIANTS if v.name in size["variants"]):
        def run(variant: Any = variant) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for n in size["segments"]:
                tokens_per_s, peak = scaling.measure(scaling.runner_for(variant, n, options, device),
                                                     1 if args.smoke else 2)
                out[f"tok_s_{n}"], out[f"peak_mib_{n}"] = tokens_per_s, peak / 2**20
            return out
        rows.append(attempt(variant.name, run))
    return rows


# ------------------------------------------------------------------------------------------------- reporting
def format_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['name']:32s} FAILED {row['error']}"
    if "skipped" in row:
        return f"{row['name']:32s} skipped ({row['skipped']})"
    figures = []
    for key, value in row.items():
        if key in ("name", "seconds") or value is None:
            continue
        if key == "mfu":
            figures.append(f"MFU {100 * value:.1f}%")
        elif isinstance(value, float):
            figures.append(f"{key} {value:.3g}" if abs(value) < 1e4 else f"{key} {value:,.0f}")
        else:
            figures.append(f"{key} {value}")
    return f"{row['name']:32s} " + "  ".join(figures)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, from the training rows measured in this run."""
    by_name = {r["name"]: r for r in rows if "step_ms" in r}
    lines = []
    for suffix in ("", " compiled"):
        for label, a, b, target in (("rmt/none", "rmt", "none", 1.15),
                                    ("checkpointing/rmt", "rmt + checkpointing", "rmt", 1.35),
                                    ("ZeRO-3/ZeRO-2", "rmt ZeRO-3", "rmt", 1.25)):
            if a + suffix in by_name and b + suffix in by_name:
                x = by_name[a + suffix]["step_ms"] / by_name[b + suffix]["step_ms"]
                lines.append(f"{label}{suffix}: {x:.2f}x step time (target <= {target}x)")
    for name in ("none", "rmt", "rmt + checkpointing", "rmt ZeRO-3"):
        if name in by_name and name + " compiled" in by_name:
            lines.append(f"compile speed-up, {name}: "
                         f"{by_name[name]['step_ms'] / by_name[name + ' compiled']['step_ms']:.2f}x")
    return lines


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for package in ("deepspeed", "transformers", "recurrent_memory_transformer_pytorch"):
        try:
            versions[package] = __import__(package).__version__
        except Exception as error:  # noqa: BLE001
            versions[package] = error_line(error)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": args.smoke,
            "compile_backend": args.compile_backend, **versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_suite.json")
    parser.add_argument("--smoke", action="store_true", help="every section tiny, on the CPU (~1 minute)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    parser.add_argument("--device", default="", help="default: cuda if available (cpu with --smoke)")
    parser.add_argument("--compile-backend", default="", help="torch.compile backend for the compiled training "
                        "variants (default inductor; aot_eager with --smoke: dynamo + AOTAutograd, no code generation)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense peak for MFU "
                        "(default: train/flops.py's table for CUDA devices; with --smoke 0.19, this CPU's fp32 roof)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    if args.smoke and not args.peak_tflops:
        args.peak_tflops = 0.19
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    wanted = [s for s in args.sections.split(",") if s]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})")
    report: dict[str, Any] = {"environment": environment(device, args)}
    runners = {"kinds": section_kinds, "hf": section_hf, "training": section_training, "peer": section_peer,
               "scaling": section_scaling}
    started = time.perf_counter()
    for section in wanted:
        print(f"== {section}", flush=True)
        try:
            report[section] = runners[section](args, device)
        except Exception as error:  # noqa: BLE001 - a section's own set-up failed: reported, the rest go on
            traceback.print_exc()
            report[section] = [{"name": section, "error": error_line(error)}]
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))  # partial results survive a timeout
    report["total_seconds"] = time.perf_counter() - started
    report["ratios"] = ratios(report.get("training", []))
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    env = report["environment"]
    print(f"\n{env['device']}, torch {env['torch']}, deepspeed {env['deepspeed']}, transformers {env['transformers']}"
          f"{' (smoke)' if args.smoke else ''}; {report['total_seconds']:.0f} s; {args.out}")
    for section in wanted:
        print(f"-- {section}")
        for row in report[section]:
            print(f"   {format_row(row)}")
    for line in report["ratios"]:
        print(f"   {line}")
    if any(math.isnan(v) for rows in (report.get(s, []) for s in wanted) for r in rows for v in r.values()
           if isinstance(v, float)):
        print("   (NaN figures above)")


if __name__ == "__main__":
    main()
