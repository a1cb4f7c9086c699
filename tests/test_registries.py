"""One home per concept: the tables of memory kinds and workloads are what every reader asks, and the
torch-only core stays free of Ray, DeepSpeed and MLflow."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rmt_dist.config import Config, ConfigError, from_flat, validate
from rmt_dist.memory_kinds import MEMORY_KINDS, memory_kind
from rmt_dist.model import MemoryModel, build_model
from rmt_dist.workload_kinds import DATASETS, TASKS, validation_metric


def test_an_unknown_memory_kind_is_an_error_everywhere_never_a_silent_none() -> None:
    with pytest.raises(ValueError, match="memory.kind must be one of none, memtr, xl, rmt, rmt_xl, infinite"):
        memory_kind("rmtx")
    cfg = Config()
    cfg.memory.kind = "rmtx"
    with pytest.raises(ConfigError, match="memory.kind must be one of"):
        validate(cfg)
    with pytest.raises(ValueError, match="memory.kind must be one of"):  # the model without validation too
        build_model(cfg, vocab_size=10)


@pytest.mark.parametrize("kind", list(MEMORY_KINDS))
def test_the_model_follows_the_kinds_table(kind: str) -> None:
    """What the table says a kind has is what the model builds and carries."""
    spec = MEMORY_KINDS[kind]
    cfg = from_flat({"memory.kind": kind, "memory.num_tokens": 3, "memory.xl_len": 4 if spec.xl_cache else 0,
                     "memory.ltm_basis": 4, "model.d_model": 16, "model.n_heads": 2, "model.d_ff": 32})
    model: MemoryModel = build_model(validate(cfg), vocab_size=11)
    ids = torch.randint(0, 11, (2, 5))
    out = model(ids, ids, model.init_state())
    assert (model.memory_init is not None) == spec.memory_tokens
    assert (out.state.memory is not None) == spec.write_tokens
    assert (out.state.xl is not None) == spec.xl_cache
    assert (out.state.ltm is not None) == spec.ltm
    assert model.recurrent == spec.recurrent and model.carries_gradient == spec.carries_gradient
    assert (model.state_bytes_per_sequence() > 0) == spec.recurrent


def test_every_task_generator_has_a_name_in_the_workload_table() -> None:
    from rmt_dist.data.tasks import TASKS as GENERATORS

    assert tuple(GENERATORS) == TASKS


def test_the_validation_metric_follows_the_dataset_and_the_tokenizer() -> None:
    assert [validation_metric(d) for d in DATASETS] == ["ppl", "bpc", "ppl", "bpc", "bpc", "acc", "acc"]
    # a byte-level corpus read by a pretrained model's tokenizer is perplexity per token
    assert validation_metric("wikitext-103-raw", hf_tokenizer=True) == "ppl"
    assert validation_metric("classify", hf_tokenizer=True) == "acc"


def test_the_model_core_imports_neither_ray_deepspeed_nor_mlflow() -> None:
    code = ("import sys, rmt_dist.model, rmt_dist.model.generate, rmt_dist.config, rmt_dist.memory_kinds, "
            "rmt_dist.workload_kinds; "
            "print(sorted(m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_config_imports_no_torch() -> None:
    """Flags are checked before anything heavy loads (``--help`` and bad input answer in a blink)."""
    code = "import sys, rmt_dist.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
