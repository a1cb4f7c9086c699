"""One checkpoint = DeepSpeed's per-rank files + each rank's trainer state + a manifest per rank.

Every rank saves into its own local directory and reports it; Ray merges them into one checkpoint
directory in storage. The trainer state holds what DeepSpeed does not: the step, RNG states and the
workload's state dict (its data position and, for LM streams, their recurrent memory). Each manifest lists the size and
SHA-256 of every file its rank wrote, so a truncated or altered checkpoint is refused at resume
instead of being loaded silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DS_TAG = "ds"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (missing, truncated or altered files, other world size)."""


@dataclass
class TrainerState:
    """One rank's part of a checkpoint besides DeepSpeed's; saved with ``torch.save`` and read back with
    ``weights_only=True``, so every field holds tensors, plain numbers, strings, lists and dicts only."""

    step: int
    workload: dict[str, Any]  # the workload's state_dict(): data position (+ the streams' recurrent state)
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None


def _upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """A trainer state written before workloads had state dicts (up to commit ddbbb39) kept the position
    as JSON and the stream beside it, in the layout ``StreamState.state_dict()`` has now."""
    if "workload" in payload:
        return payload
    old = dict(payload)
    workload = {"position": json.loads(old.pop("data_position"))}
    stream = old.pop("stream")
    if stream is not None:
        workload["stream"] = stream
    return {**old, "workload": workload}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(engine: Any, state: TrainerState, directory: Path, rank: int, node_id: str = "") -> None:
    """Collective: every rank must call it (DeepSpeed's save has barriers). ``node_id`` (the Ray
    node that wrote this rank's shard) goes into the manifest for debugging multi-node runs."""
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=DS_TAG)
    payload = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    torch.save(payload, directory / f"trainer_state_rank{rank}.pt")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("manifest_"))
    manifest = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    tmp = directory / f".manifest_rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "node_id": node_id, "files": manifest}, indent=1))
    tmp.rename(directory / f"manifest_rank{rank}.json")


def verify(directory: Path, world_size: int) -> None:
    """Raise CheckpointError unless every rank's manifest is present and every file matches it."""
    manifests = sorted(directory.glob("manifest_rank*.json"))
    if len(manifests) != world_size:
        raise CheckpointError(
            f"checkpoint {directory} has {len(manifests)} rank manifests, expected {world_size} "
            "(a ZeRO checkpoint resumes only at the world size that wrote it)")
    for manifest in manifests:
        for rel, meta in json.loads(manifest.read_text())["files"].items():
            path = directory / rel
            if not path.is_file():
                raise CheckpointError(f"checkpoint {directory} is missing {rel} (listed in {manifest.name})")
            if path.stat().st_size != meta["size"]:
                raise CheckpointError(
                    f"checkpoint file {rel} is {path.stat().st_size} bytes, {manifest.name} says {meta['size']} "
                    "(truncated?)")
            if _sha256(path) != meta["sha256"]:
                raise CheckpointError(f"checkpoint file {rel} does not match its SHA-256 in {manifest.name} (altered?)")


def load(engine: Any, directory: Path, rank: int, world_size: int) -> TrainerState:
    """Verify the checkpoint, load DeepSpeed's state into ``engine`` and return this rank's trainer state."""
    verify(directory, world_size)
    path, _ = engine.load_checkpoint(str(directory), tag=DS_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {directory}")
    payload = torch.load(directory / f"trainer_state_rank{rank}.pt", weights_only=True)
    return TrainerState(**_upgrade(payload))
