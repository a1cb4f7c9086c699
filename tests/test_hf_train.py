"""model.backbone=hf through the whole service: real Ray Train workers, DeepSpeed ZeRO-3, MLflow server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import rmt_dist
from rmt_dist.config import Config, apply_overrides, from_flat
from rmt_dist.data import LMStreams, load_lm_corpus
from rmt_dist.model import StreamState, build_model, from_pretrained, stream_train_step
from rmt_dist.presets import PRESETS
from rmt_dist.train.driver import run_training
from rmt_dist.train.export import consolidated_state_dict

from hf_tiny import bert_dir, gpt2_dir
from test_train_distributed import mlflow_history

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf")


def reference_sgd_step(cfg: Config, world: int) -> dict[str, torch.Tensor]:
    """Weights after one plain-PyTorch SGD step from the pretrained weights on the mean gradient of what
    each rank sees at step 1."""
    corpus = load_lm_corpus(cfg.data, cfg.model.hf_name_or_path)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, corpus.vocab_size)
    d = cfg.data
    for rank in range(world):
        window = next(iter(LMStreams(corpus.train, cfg.train.batch_size, world, rank, d.segment_len, d.num_segments)))
        stream_train_step(model, StreamState(), window, bptt_unroll=cfg.memory.bptt_unroll,
                          bptt_mode=cfg.memory.bptt_mode, backward=lambda loss: (loss / world).backward())
    with torch.no_grad():
        return {name: (p - cfg.train.lr * p.grad).clone() for name, p in model.named_parameters()}


def test_zero3_on_two_ray_workers_trains_gpt2_with_memory_resumes_and_exports(tmp_path, hf_root, data_cache,
                                                                              ray_local, mlflow_server):
    gpt2 = gpt2_dir(hf_root)
    flat: dict[str, Any] = {
        **PRESETS["finetune_lm"]["smoke"], "model.hf_name_or_path": gpt2, "data.cache_dir": data_cache,
        "storage.path": str(tmp_path / "runs"), "storage.run_name": "gpt2-zero3", "storage.num_to_keep": 10,
        "deepspeed.zero_stage": 3, "train.activation_checkpointing": True, "train.optimizer": "sgd",
        "train.lr": 0.5, "train.lr_schedule": "constant", "train.warmup_steps": 0, "train.grad_clip": 0.0,
        "train.max_steps": 1, "train.eval_interval": 1, "train.eval_batches": 1, "data.segment_len": 16,
        "data.num_segments": 2, "memory.num_tokens": 2, "memory.bptt_unroll": 1, "mlflow.tracking_uri": mlflow_server}
    first = run_training(from_flat(flat), "test_hf_zero3")
    assert first.metrics["step"] == 1

    # The pretrained weights were loaded into the sharded model: ZeRO-3's step 1 is the single-process step.
    got = consolidated_state_dict(Path(first.checkpoint), zero_stage=3)
    cfg = apply_overrides(from_flat(flat), {"model.vocab_size": first_vocab(flat)})
    want = reference_sgd_step(cfg, world=2)
    assert set(want) <= set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)

    export = tmp_path / "export"
    second = run_training(from_flat({**flat, "train.max_steps": 3, "train.eval_interval": 2,
                                     "storage.export_path": str(export)}), "test_hf_zero3")
    assert second.metrics["step"] == 3
    resumed = mlflow_history(mlflow_server, second.mlflow_run_id, "train_loss")
    assert list(resumed) == [2, 3], "the second run must resume at step 2, not start over"
    val = {**mlflow_history(mlflow_server, first.mlflow_run_id, "val_loss"),
           **mlflow_history(mlflow_server, second.mlflow_run_id, "val_loss")}
    assert list(val) == [1, 2, 3] and val[3] < val[1], val

    model, exported_cfg = from_pretrained(export)
    assert (exported_cfg.memory.kind, exported_cfg.memory.num_tokens, exported_cfg.data.segment_len) == ("rmt", 2, 16)
    final = consolidated_state_dict(Path(second.checkpoint), zero_stage=3)
    torch.testing.assert_close(model.memory_init.weight, final["memory_init.weight"])
    prompt = torch.randint(1, 300, (1, 20))
    assert rmt_dist.generate(model, prompt, segment_len=16, max_new_tokens=5).shape == (1, 25)


def first_vocab(flat: dict[str, Any]) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(flat["model.hf_name_or_path"]))


def test_classify_long_job_end_to_end_on_zero3_logs_accuracy_f1_and_the_curriculum(tmp_path, hf_root, data_cache, ray_local,
                                                                          mlflow_server, capsys):
    import mlflow

    from rmt_dist.cli import run_job
    from test_hf_data import write_documents

    write_documents(tmp_path / "docs.jsonl", 60)
    argv = ["--preset", "smoke", "--model.hf_name_or_path", bert_dir(hf_root), "--data.path", str(tmp_path / "docs.jsonl"),
            "--data.cache_dir", data_cache, "--data.segment_len", "16", "--data.num_segments", "3",
            "--memory.num_tokens", "2", "--train.max_steps", "4", "--train.eval_interval", "2",
            "--train.curriculum", "steps:2", "--storage.path", str(tmp_path / "runs"),
            "--storage.export_path", str(tmp_path / "export"), "--deepspeed.zero_stage", "3",
            "--mlflow.tracking_uri", mlflow_server, "--mlflow.experiment", "test_classify_long"]
    assert run_job("classify_long", PRESETS["classify_long"], argv) == 0
    out = capsys.readouterr().out
    assert "val_acc=" in out and "val_f1=" in out, out

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("test_classify_long").experiment_id])[0]
    assert run.info.status == "FINISHED"
    for key in ("val_acc", "val_f1"):
        history = mlflow_history(mlflow_server, run.info.run_id, key)
        assert list(history) == [2, 4] and all(0.0 <= v <= 1.0 for v in history.values()), (key, history)
    # 1 segment for steps 1-2, then 2 (the schedule), evaluated at the segments trained on
    assert mlflow_history(mlflow_server, run.info.run_id, "segments") == {2: 1.0, 4: 2.0}
    assert run.data.params["train.curriculum"] == "steps:2" and run.data.params["data.dataset"] == "classify"

    model, cfg = from_pretrained(tmp_path / "export")  # ZeRO-3 shards consolidated, class names kept
    assert model.backbone.is_encoder and model.backbone.hf.config.id2label == {0: "center", 1: "left", 2: "right"}
    final = consolidated_state_dict(Path(run.data.tags["final_checkpoint"]), zero_stage=3)
    torch.testing.assert_close(model.backbone.head[2].weight, final["backbone.head.2.weight"])
