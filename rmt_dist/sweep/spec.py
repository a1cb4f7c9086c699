"""A sweep's spec: its base config, grid points, random keys, scheduler and the metric it is judged by."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rmt_dist.sweep.space import Dim
from rmt_dist.train import metrics as M


@dataclass
class SweepSpec:
    """Everything a sweep runs, JSON-serialisable (kept beside the Tune experiment for resumes)."""

    name: str
    job: str
    preset: str
    base: dict[str, Any]  # flat, validated; storage.path absolute, MLflow URI resolved
    points: list[dict[str, Any]]  # {"overrides": {...}, "label": str, "paper_row": str|None, "paper_value": ...}
    random: list[Dim]
    grid_keys: list[str]  # searched grid keys (or the paper grid's row keys)
    grid: str | None = None
    num_samples: int = 1
    scheduler: str = "none"
    asha_grace: int = 1
    asha_reduction: float = 2.0
    max_concurrent: int | None = None  # None = as many as the cluster's CPUs/GPUs hold
    metric: str = M.VAL_PPL
    mode: str = "min"
    dropped: int = 0  # grid points that normalised to an earlier point (the baseline, once)
    forward_env: dict[str, str] = field(default_factory=dict)

    @property
    def searched_keys(self) -> list[str]:
        return [*self.grid_keys, *(d.key for d in self.random)]

    @property
    def num_trials(self) -> int:
        return len(self.points) * self.num_samples

    def identity(self) -> dict[str, Any]:
        """What must match for a rerun to resume this sweep (not where it runs or logs)."""
        trained = {k: v for k, v in self.base.items() if k.split(".", 1)[0] not in ("storage", "mlflow", "scaling")}
        return {"job": self.job, "base": trained, "points": self.points,
                "random": [dataclasses.asdict(d) for d in self.random], "num_samples": self.num_samples,
                "scheduler": self.scheduler, "asha_grace": self.asha_grace, "asha_reduction": self.asha_reduction}

    def experiment_name(self) -> str:
        return self.base["mlflow.experiment"] or self.job
