"""The training loop in one process, without Ray: ``loop.run`` with ``torch.distributed`` on gloo at world
size 1, DeepSpeed ZeRO-2 on CPU and a reporter that records what it is given.

What it protects: every step reports ``train_loss`` (the step's loss) once; evaluations report the
validation metric with a checkpoint; a run resumed from the reporter's last checkpoint continues at the
next step with the losses of an uninterrupted run (the recurrent memory and the data position
restored), also from a checkpoint in the format written before workloads had state dicts; a
threshold curriculum's stage survives the resume.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from conftest import free_port
from rmt_dist.config import Config, from_flat
from rmt_dist.presets import PRESETS
from rmt_dist.train import checkpoint, metrics as M
from rmt_dist.train.loop import WorkerContext, run

METRIC_NAMES = {v for k, v in vars(M).items() if k.isupper() and isinstance(v, str)}
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def process_group(gloo_world: None) -> Iterator[None]:
    """The environment a Ray worker gets, for one rank; DeepSpeed then joins the existing group."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class Interrupted(Exception):
    pass


class Recorder:
    """Keeps every report and a copy of every checkpoint; raises after reporting ``stop_at`` (a crash)."""

    def __init__(self, keep: Path, stop_at: int | None = None) -> None:
        self.keep, self.stop_at = keep, stop_at
        self.reports: list[tuple[dict[str, float], Path | None]] = []
        self.closed = False

    def report(self, metrics: dict[str, float], checkpoint: Path | None = None) -> None:
        kept = None
        if checkpoint is not None:
            kept = self.keep / f"step{metrics[M.STEP]}"
            shutil.copytree(checkpoint, kept)
        self.reports.append((dict(metrics), kept))
        if metrics[M.STEP] == self.stop_at:
            raise Interrupted

    def close(self) -> None:
        self.closed = True

    def by_step(self) -> dict[int, dict[str, float]]:
        return {int(m[M.STEP]): m for m, _ in self.reports}

    def last_checkpoint(self) -> Path:
        return [c for _, c in self.reports if c is not None][-1]


def train(cfg: Config, keep: Path, stop_at: int | None = None, resume: Path | None = None) -> Recorder:
    recorder = Recorder(keep, stop_at)
    keep.mkdir(parents=True)
    ctx = WorkerContext(rank=0, world_size=1, device=CPU, resume=None if resume is None else lambda _: resume)
    try:
        run(cfg, ctx, recorder)
    except Interrupted:
        pass
    return recorder


def lm_config(data_cache: str) -> Config:
    return from_flat({**PRESETS["lm_wikitext"]["smoke"], "data.cache_dir": data_cache, "scaling.num_workers": 1,
                      "train.max_steps": 6, "train.eval_interval": 2, "train.eval_batches": 1,
                      "mlflow.enabled": False})


def task_config(tmp_path: Path) -> Config:
    """A retrieval task whose samples grow from 1 to 3 segments after each evaluation with val_acc >= 0.05."""
    return from_flat({**PRESETS["algorithmic"]["smoke"], "data.task": "retrieval_random", "data.task_length": 180,
                      "data.segment_len": 64, "data.num_segments": 3, "data.num_train": 64, "data.num_valid": 8,
                      "data.num_test": 8, "data.cache_dir": str(tmp_path / "cache"), "train.batch_size": 4,
                      "train.curriculum": "acc:0.05", "train.max_steps": 6, "train.eval_interval": 2,
                      "scaling.num_workers": 1, "mlflow.enabled": False})


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory: pytest.TempPathFactory, data_cache: str) -> dict[str, Any]:
    """The smoke LM trained 6 steps straight through, and the same run crashed after step 5 (its last
    checkpoint: step 4)."""
    root = tmp_path_factory.mktemp("lm")
    cfg = lm_config(data_cache)
    return {"cfg": cfg, "root": root, "straight": train(cfg, root / "straight"),
            "crashed": train(cfg, root / "crashed", stop_at=5)}


def assert_same_losses(resumed: Recorder, straight: Recorder, steps: list[int], key: str) -> None:
    assert sorted(resumed.by_step()) == steps
    for step in steps:
        assert resumed.by_step()[step][M.TRAIN_LOSS] == pytest.approx(straight.by_step()[step][M.TRAIN_LOSS],
                                                                      rel=1e-6, abs=1e-7), step
    assert resumed.by_step()[steps[-1]][key] == pytest.approx(straight.by_step()[steps[-1]][key], rel=1e-6)


def test_every_step_reports_its_loss_once_and_evaluations_report_a_checkpoint(lm_runs) -> None:
    straight = lm_runs["straight"]
    steps = [int(m[M.STEP]) for m, _ in straight.reports]
    assert steps == [1, 2, 3, 4, 5, 6] and straight.closed
    for metrics, kept in straight.reports:
        assert set(metrics) <= METRIC_NAMES
        if metrics[M.STEP] % 2:
            assert set(metrics) == {M.STEP, M.TRAIN_LOSS} and kept is None
        else:
            assert {M.TRAIN_LOSS, M.TRAIN_LOSS_INTERVAL, M.VAL_LOSS, M.VAL_PPL, M.TOKENS_PER_S, M.PEAK_MEM_BYTES,
                    M.MEMORY_STATE_BYTES} <= set(metrics)
            checkpoint.verify(kept, world_size=1)
    by_step = straight.by_step()
    # train_loss is the step's own; every LM step has the same tokens, so the interval's is their mean.
    assert by_step[4][M.TRAIN_LOSS_INTERVAL] == pytest.approx((by_step[3][M.TRAIN_LOSS] + by_step[4][M.TRAIN_LOSS]) / 2)
    assert by_step[4][M.TRAIN_LOSS] != by_step[4][M.TRAIN_LOSS_INTERVAL]
    assert by_step[2][M.MEMORY_STATE_BYTES] == 4 * 64 * 4  # 4 memory tokens x d_model 64 x fp32


def test_a_resumed_run_continues_with_the_losses_of_an_uninterrupted_one(lm_runs) -> None:
    crashed = lm_runs["crashed"]
    assert sorted(crashed.by_step()) == [1, 2, 3, 4, 5] and not crashed.closed
    last = crashed.last_checkpoint()
    stream = torch.load(last / "trainer_state_rank0.pt", weights_only=True)["workload"]["stream"]
    assert stream["state"]["memory"] is not None and len(stream["history"]) == 1  # rmt, sliding BPTT 1
    resumed = train(lm_runs["cfg"], lm_runs["root"] / "resumed", resume=last)
    assert_same_losses(resumed, lm_runs["straight"], [5, 6], M.VAL_LOSS)


def write_old_format(directory: Path) -> None:
    """Rewrite rank 0's trainer state as checkpoints were written up to commit ddbbb39 (the position as
    JSON, the stream beside it), and its manifest to match."""
    path = directory / "trainer_state_rank0.pt"
    new = torch.load(path, weights_only=True)
    stream = new["workload"].get("stream")
    old = {"step": new["step"], "data_position": json.dumps(new["workload"]["position"]),
           "stream": None if stream is None else {
               "state": {"memory": stream["state"]["memory"], "xl": stream["state"]["xl"],
                         "ltm": stream["state"]["ltm"]},
               "history": [list(s) for s in stream["history"]]},
           "rng_cpu": new["rng_cpu"], "rng_cuda": new["rng_cuda"]}
    torch.save(old, path)
    manifest = directory / "manifest_rank0.json"
    content = json.loads(manifest.read_text())
    content["files"][path.name] = {"size": path.stat().st_size, "sha256": checkpoint._sha256(path)}
    manifest.write_text(json.dumps(content))


def test_a_checkpoint_in_the_format_before_workload_state_dicts_resumes(lm_runs) -> None:
    old = lm_runs["root"] / "old_format"
    shutil.copytree(lm_runs["crashed"].last_checkpoint(), old)
    write_old_format(old)
    assert "data_position" in torch.load(old / "trainer_state_rank0.pt", weights_only=True)
    resumed = train(lm_runs["cfg"], lm_runs["root"] / "resumed_old", resume=old)
    assert_same_losses(resumed, lm_runs["straight"], [5, 6], M.VAL_LOSS)


def test_a_task_run_resumes_at_its_curriculum_stage(tmp_path) -> None:
    cfg = task_config(tmp_path)
    straight = train(cfg, tmp_path / "straight")
    evaluations = {s: m for s, m in straight.by_step().items() if s % 2 == 0}
    assert all(set(m) <= METRIC_NAMES and M.VAL_ACC in m for m in evaluations.values())
    assert [int(m[M.SEGMENTS]) for m in evaluations.values()] == [1, 2, 3]  # grown after each evaluation
    crashed = train(cfg, tmp_path / "crashed", stop_at=5)
    resumed = train(cfg, tmp_path / "resumed", resume=crashed.last_checkpoint())
    assert_same_losses(resumed, straight, [5, 6], M.VAL_ACC)
    assert resumed.by_step()[6][M.SEGMENTS] == 3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_dtype_is_the_engines_weight_dtype(precision) -> None:
    """memory_state_bytes is priced in engine.model_dtype(cfg): DeepSpeed must cast the module to it."""
    from rmt_dist.model import build_model
    from rmt_dist.train.engine import build_engine, model_dtype

    cfg = from_flat({**PRESETS["lm_wikitext"]["smoke"], "deepspeed.precision": precision, "scaling.num_workers": 1})
    engine = build_engine(build_model(cfg, vocab_size=50), cfg)
    assert {p.dtype for p in engine.module.parameters()} == {model_dtype(cfg)}


def test_mfu_on_a_known_gpu_is_counted_flops_over_time_and_peak(tmp_path, data_cache, monkeypatch) -> None:
    """The loop counts the step's FLOPs once and reports MFU per interval where the device's peak is known
    (faked here: on the CPU ``peak_flops`` is None and no MFU is reported)."""
    from rmt_dist.data import load_lm_corpus
    from rmt_dist.model import build_model
    from rmt_dist.train import flops

    cfg = lm_config(data_cache)
    per_step = flops.step_flops(build_model(cfg, load_lm_corpus(cfg.data).vocab_size), cfg)
    assert all(M.MFU not in m for m, _ in train(cfg, tmp_path / "cpu").reports)
    peak = 1e9
    monkeypatch.setattr(flops, "peak_flops", lambda device: peak)
    evaluations = [m for m, kept in train(cfg, tmp_path / "gpu").reports if kept is not None]
    assert len(evaluations) == 3
    # MFU = FLOPs per step x steps / seconds / peak, and tokens/s = tokens per step x steps / seconds
    tokens_per_step = cfg.train.batch_size * cfg.data.segment_len * cfg.data.num_segments
    for m in evaluations:
        assert m[M.MFU] * peak == pytest.approx(per_step * m[M.TOKENS_PER_S] / tokens_per_step, rel=1e-3)
