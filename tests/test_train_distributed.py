"""Real Ray Train + DeepSpeed (gloo, CPU) with 2 workers: ZeRO stages, gradients, checkpoints, resume."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from rmt_dist.config import Config, apply_overrides, from_flat
from rmt_dist.data import LMStreams, load_lm_corpus
from rmt_dist.model import StreamState, build_model, stream_train_step
from rmt_dist.presets import PRESETS
from rmt_dist.train import checkpoint
from rmt_dist.train.driver import run_training

pytestmark = pytest.mark.slow


def smoke_config(tmp_path: Path, data_cache: str, **overrides: Any) -> Config:
    flat = {**PRESETS["lm_wikitext"]["smoke"], "data.cache_dir": data_cache, "storage.path": str(tmp_path / "runs"),
            "mlflow.enabled": False, **overrides}
    return from_flat(flat)


def fp32_weights(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=checkpoint.DS_TAG)


def reference_sgd_step(cfg: Config, world: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial, after) weights of one plain-PyTorch SGD step on the mean gradient of what each rank
    sees at step 1."""
    corpus = load_lm_corpus(cfg.data)
    cfg = apply_overrides(cfg, {"model.vocab_size": corpus.vocab_size})
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, corpus.vocab_size)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    d = cfg.data
    for rank in range(world):
        streams = LMStreams(corpus.train, cfg.train.batch_size, world, rank, d.segment_len, d.num_segments)
        window = next(iter(streams))
        stream_train_step(model, StreamState(), window, bptt_unroll=cfg.memory.bptt_unroll,
                          bptt_mode=cfg.memory.bptt_mode, replay=cfg.memory.replay_backprop,
                          backward=lambda loss: (loss / world).backward())
    with torch.no_grad():
        return initial, {name: (p - cfg.train.lr * p.grad).clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_gradients_match_single_process_and_loss_falls(stage, tmp_path, data_cache, ray_local):
    cfg = smoke_config(tmp_path, data_cache, **{
        "deepspeed.zero_stage": stage, "train.activation_checkpointing": True, "train.optimizer": "sgd",
        "train.lr": 0.5, "train.lr_schedule": "constant", "train.warmup_steps": 0, "train.grad_clip": 0.0,
        "train.max_steps": 6, "train.eval_interval": 1, "train.eval_batches": 1, "storage.num_to_keep": 10})
    result = run_training(cfg, "test_zero", run_name=f"zero{stage}")
    assert result.metrics["step"] == 6

    from ray.train.v2.api.result import Result

    run = Result.from_path(str(Path(result.storage) / f"zero{stage}"))
    by_step = {m["step"]: (ckpt, m) for ckpt, m in run.best_checkpoints}
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6]
    losses = [by_step[s][1]["val_loss"] for s in range(1, 7)]
    assert losses[-1] < losses[0] - 0.5, losses

    got = fp32_weights(by_step[1][0].path)
    initial, want = reference_sgd_step(cfg, world=2)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    # Every parameter moved: the comparison has teeth (a rank's gradient lost would show).
    assert all(not torch.allclose(initial[n], want[n]) for n in want)
    assert math.isfinite(result.metrics["val_ppl"])


def mlflow_history(uri: str, run_id: str, key: str) -> dict[int, float]:
    """Last logged value of a metric per step (a resumed run logs re-run steps again)."""
    import mlflow

    values: dict[int, tuple[int, float]] = {}
    for m in mlflow.MlflowClient(tracking_uri=uri).get_metric_history(run_id, key):
        if m.step not in values or m.timestamp >= values[m.step][0]:
            values[m.step] = (m.timestamp, m.value)
    return {step: v for step, (_, v) in sorted(values.items())}


def test_killed_worker_resumes_from_checkpoint_with_identical_losses(tmp_path, data_cache, ray_local, monkeypatch):
    overrides = {"train.max_steps": 8, "train.eval_interval": 2, "train.eval_batches": 2, "scaling.max_failures": 1,
                 "mlflow.enabled": True, "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    clean = run_training(smoke_config(tmp_path, data_cache, **overrides), "test_fault", run_name="clean")

    marker = tmp_path / "killed"
    monkeypatch.setenv("RMT_DIST_FAULT_AT_STEP", f"5:1:{marker}")
    faulty = run_training(smoke_config(tmp_path, data_cache, **overrides), "test_fault", run_name="faulty")
    assert marker.exists(), "the fault was never injected"

    uri = overrides["mlflow.tracking_uri"]
    clean_losses = mlflow_history(uri, clean.mlflow_run_id, "train_loss")
    faulty_losses = mlflow_history(uri, faulty.mlflow_run_id, "train_loss")
    assert list(clean_losses) == list(range(1, 9)) == list(faulty_losses)
    for step in clean_losses:
        assert faulty_losses[step] == pytest.approx(clean_losses[step], abs=1e-5), step
    assert faulty.metrics["val_loss"] == pytest.approx(clean.metrics["val_loss"], abs=1e-5)


def test_truncated_or_altered_checkpoint_is_refused(tmp_path, data_cache, ray_local):
    cfg = smoke_config(tmp_path, data_cache, **{"train.max_steps": 2, "train.eval_interval": 2})
    result = run_training(cfg, "test_corrupt", run_name="corrupt")
    ckpt = Path(result.checkpoint)
    checkpoint.verify(ckpt, world_size=2)  # intact: accepted

    with pytest.raises(checkpoint.CheckpointError, match="resumes only at the world size"):
        checkpoint.verify(ckpt, world_size=4)
    state_file = ckpt / "trainer_state_rank1.pt"
    original = state_file.read_bytes()
    state_file.write_bytes(original[: len(original) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.verify(ckpt, world_size=2)
    altered = bytearray(original)
    altered[-10] ^= 0xFF
    state_file.write_bytes(bytes(altered))
    with pytest.raises(checkpoint.CheckpointError, match="altered"):
        checkpoint.verify(ckpt, world_size=2)

    # Resuming the run from the altered checkpoint fails loudly instead of training on.
    more = apply_overrides(cfg, {"train.max_steps": 4})
    with pytest.raises(Exception, match="SHA-256"):
        run_training(more, "test_corrupt", run_name="corrupt")


def test_checkpoints_go_to_s3_and_resume_from_there_without_leaking_credentials(tmp_path, data_cache, ray_local,
                                                                                 s3_server):
    import boto3
    import mlflow
    import ray

    from conftest import S3_SECRET

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="ckpts")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = {"storage.path": "s3://ckpts/runs", "storage.endpoint_url": s3_server, "storage.run_name": "s3run",
                 "train.eval_interval": 2, "mlflow.enabled": True, "mlflow.tracking_uri": uri}
    first = run_training(smoke_config(tmp_path, data_cache, **overrides, **{"train.max_steps": 4}), "test_s3")
    assert first.checkpoint.startswith("s3://ckpts/runs/s3run/")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpts", Prefix="runs/s3run/")["Contents"]]
    for name in ("manifest_rank0.json", "manifest_rank1.json", "trainer_state_rank0.pt", "trainer_state_rank1.pt"):
        assert any(k.endswith(name) for k in keys), name

    resumed = run_training(smoke_config(tmp_path, data_cache, **overrides, **{"train.max_steps": 6}), "test_s3")
    assert resumed.metrics["step"] == 6
    assert list(mlflow_history(uri, resumed.mlflow_run_id, "train_loss")) == [5, 6]  # steps 1-4 came from S3

    client = mlflow.MlflowClient(tracking_uri=uri)
    for run_id in (first.mlflow_run_id, resumed.mlflow_run_id):
        run = client.get_run(run_id)
        assert S3_SECRET not in repr(run.data.params) + repr(run.data.tags)
    for key in [o["Key"] for o in s3.list_objects_v2(Bucket="ckpts")["Contents"]]:
        assert S3_SECRET.encode() not in s3.get_object(Bucket="ckpts", Key=key)["Body"].read(), key
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for log in logs.rglob("*"):
        if log.is_file():
            assert S3_SECRET not in log.read_text(errors="ignore"), log


def test_s3_outage_during_save_fails_clearly_and_keeps_the_last_good_checkpoint(tmp_path, data_cache, ray_local):
    """The S3 endpoint stops answering after the first checkpoint: the run fails with a storage
    error, the first checkpoint stays intact, and once S3 is back the run resumes from it."""
    import threading

    import boto3
    from moto.server import ThreadedMotoServer

    from conftest import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="flaky")
    overrides = {"storage.path": "s3://flaky/runs", "storage.endpoint_url": endpoint, "storage.run_name": "outage",
                 "train.max_steps": 30, "train.eval_interval": 10, "train.eval_batches": 1}

    def stop_after_first_checkpoint() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            listing = s3.list_objects_v2(Bucket="flaky", Prefix="runs/outage/")
            if any(o["Key"].endswith("checkpoint_manager_snapshot.json") for o in listing.get("Contents", [])):
                server.stop()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=stop_after_first_checkpoint, daemon=True)
    watcher.start()
    with pytest.raises(Exception) as failure:
        run_training(smoke_config(tmp_path, data_cache, **overrides), "test_outage")
    watcher.join(timeout=5)
    assert "127.0.0.1" in str(failure.value) or "connect" in str(failure.value).lower(), str(failure.value)[-2000:]

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # S3 is back, same state
    server.start()
    try:
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="flaky", Prefix="runs/outage/")["Contents"]]
        first = sorted({k.split("/")[2] for k in keys if "/checkpoint_" in k})[0]
        local = tmp_path / "first"
        for key in keys:
            if f"/{first}/" in key and not key.endswith("/"):
                target = local / key.split(f"/{first}/", 1)[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file("flaky", key, str(target))
        checkpoint.verify(local, world_size=2)  # intact: every file matches its manifest
        resumed = run_training(smoke_config(tmp_path, data_cache, **overrides), "test_outage")
        assert resumed.metrics["step"] == 30
    finally:
        server.stop()


def test_default_mlflow_uri_is_the_drivers_file_for_every_worker(tmp_path, data_cache, ray_local, monkeypatch):
    """README command 1 leaves mlflow.tracking_uri empty: sqlite:///mlflow.db in the driver's working
    directory. Workers run elsewhere; rank 0 must log into the driver's file, not a new one of its own."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = smoke_config(tmp_path, data_cache, **{"mlflow.enabled": True, "mlflow.tracking_uri": "",
                                                "mlflow.experiment": "default_uri", "train.max_steps": 2,
                                                "train.eval_interval": 2, "train.eval_batches": 1})
    result = run_training(cfg, "lm_wikitext", run_name="default_uri")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("default_uri").experiment_id])
    assert run.info.run_id == result.mlflow_run_id and run.info.status == "FINISHED"
    assert {"train_loss", "val_ppl", "tokens_per_s"} <= set(run.data.metrics)
