"""A training checkpoint as a Hugging Face-style directory (``storage.export_path``, model.backbone=hf).

The weights come from the checkpoint's DeepSpeed files, consolidated over every rank's ZeRO shards
(``zero_to_fp32``; stage 0 keeps the whole module in one file), so an export after ZeRO-3 training holds
the full model. The directory is what ``rmt_dist.model.save_pretrained`` writes, with the tokenizer (and, for
classification, the class names as the config's ``id2label``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rmt_dist.config import Config
from rmt_dist.model import build_model, save_pretrained
from rmt_dist.train.checkpoint import DS_TAG
from rmt_dist.train.workloads import workload_class


def consolidated_state_dict(checkpoint_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 0:
        return torch.load(checkpoint_dir / DS_TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=DS_TAG)


def export_checkpoint(cfg: Config, checkpoint_dir: Path, out: str | Path) -> None:
    from transformers import AutoTokenizer

    model = build_model(cfg, cfg.model.vocab_size)
    model.load_state_dict(consolidated_state_dict(checkpoint_dir, cfg.deepspeed.zero_stage))
    classes = workload_class(cfg).class_names(cfg)
    if classes is not None:  # a classifier's class names, where Hugging Face keeps them
        model.backbone.hf.config.id2label = dict(enumerate(classes))
        model.backbone.hf.config.label2id = {c: i for i, c in enumerate(classes)}
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_name_or_path)
    save_pretrained(model, out, cfg, tokenizer)
