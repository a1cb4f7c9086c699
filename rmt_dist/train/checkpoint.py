"""One checkpoint = DeepSpeed's per-rank files + each rank's trainer state + a manifest per rank.

Every rank saves into its own local directory and reports it; Ray merges them into one checkpoint
directory in storage. The trainer state holds what DeepSpeed does not: the step, the data position,
RNG states and the recurrent memory of this rank's streams. Each manifest lists the size and
SHA-256 of every file its rank wrote, so a truncated or altered checkpoint is refused at resume
instead of being loaded silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rmt_dist.model import MemoryState, StreamState

DS_TAG = "ds"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (missing, truncated or altered files, other world size)."""


@dataclass
class TrainerState:
    step: int
    data_position: Any  # JSON-serialisable position of this rank's data reader
    stream: StreamState | None  # recurrent state of this rank's training streams (LM only)
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None


def _state_to_dict(state: MemoryState) -> dict:
    return {"memory": state.memory, "xl": None if state.xl is None else list(state.xl),
            "ltm": None if state.ltm is None else list(state.ltm)}


def _state_from_dict(d: dict) -> MemoryState:
    ltm = d.get("ltm")  # absent in checkpoints written before kind=infinite
    return MemoryState(memory=d["memory"], xl=None if d["xl"] is None else tuple(d["xl"]),
                       ltm=None if ltm is None else tuple(ltm))


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
    stream = None
    if state.stream is not None:
        stream = {"state": _state_to_dict(state.stream.state), "history": [list(s) for s in state.stream.history]}
    payload = {"step": state.step, "data_position": json.dumps(state.data_position), "stream": stream,
               "rng_cpu": state.rng_cpu, "rng_cuda": state.rng_cuda}
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
    stream = None
    if payload["stream"] is not None:
        stream = StreamState(state=_state_from_dict(payload["stream"]["state"]),
                             history=[tuple(s) for s in payload["stream"]["history"]])
    return TrainerState(step=payload["step"], data_position=json.loads(payload["data_position"]), stream=stream,
                        rng_cpu=payload["rng_cpu"], rng_cuda=payload["rng_cuda"])
