"""Stopped trials give their workers back (a workaround for ray#54305, on Ray Train's internal API).

When Tune stops a trial (ASHA) it kills the trial's actor; the trial's Train controller dies with it,
but the placement group holding the trial's workers belongs to the job, not to the controller. Ray
2.60 removes it from a detached PlacementGroupCleaner that asks the State API whether the controller
is alive; without the dashboard (include_dashboard=False, as our local Ray and the test fixtures run)
that query fails forever, the CPUs stay reserved and the next trial waits for workers forever.
So each trial's controller records itself and its placement groups in a registry actor of the sweep,
and the sweep's driver, when Tune stops or loses a trial, aborts that controller (which shuts its
worker group down and removes the placement group, as Ctrl-C on a job does) and removes any
placement group still standing.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.actor import ActorHandle
# Ray's internal callback API, which Train's RunConfig accepts for such workarounds (ray#54305).
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group


def _registry_name(sweep_name: str) -> str:
    return f"rmt_dist_sweep_registry:{sweep_name}"


class SweepRegistry:
    """Per trial: its Train controller's handle and the placement groups of its worker groups."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def record(self, trial_id: str, controller: ActorHandle | None = None,
               placement_group: PlacementGroup | None = None) -> None:
        entry = self.entries.setdefault(trial_id, {"controller": None, "placement_groups": []})
        if controller is not None:
            entry["controller"] = controller
        if placement_group is not None:
            entry["placement_groups"].append(placement_group)

    def take(self, trial_id: str) -> dict[str, Any] | None:
        return self.entries.pop(trial_id, None)


def start_registry(sweep_name: str) -> ActorHandle:
    """The sweep's registry actor (on the sweep's driver; ``ray.kill`` it when the sweep ends)."""
    return ray.remote(num_cpus=0)(SweepRegistry).options(name=_registry_name(sweep_name), get_if_exists=True).remote()


class TrialRecorder(ControllerCallback, WorkerGroupCallback):
    """A Train controller callback that records the controller and each worker group's placement group
    in the sweep's registry."""

    def __init__(self, sweep_name: str, trial_id: str) -> None:
        self.registry, self.trial = _registry_name(sweep_name), trial_id

    def _record(self, **what: Any) -> None:
        try:
            ray.get(ray.get_actor(self.registry).record.remote(self.trial, **what), timeout=30)
        except Exception:  # no registry (a trial run outside a sweep): nothing to clean up later
            pass

    def after_controller_start(self, train_run_context: Any) -> None:
        self._record(controller=ray.get_runtime_context().current_actor)

    def after_worker_group_start(self, worker_group: Any) -> None:
        self._record(placement_group=worker_group.get_worker_group_state().placement_group_handle.placement_group)


def release_trial(sweep_name: str, trial_id: str, abort: bool) -> int:
    """Give a finished, stopped or failed trial's reservation back: abort its Train controller (when
    ``abort``) and remove its placement groups that are still there. Returns how many were removed."""
    try:
        entry = ray.get(ray.get_actor(_registry_name(sweep_name)).take.remote(trial_id), timeout=30)
    except Exception:
        return 0
    if not entry:
        return 0
    if abort and entry["controller"] is not None:
        try:
            ray.get(entry["controller"].abort.remote(), timeout=120)
        except Exception:  # it exits inside abort, or it is already dead: either is fine
            pass
    removed = 0
    for pg in entry["placement_groups"]:
        try:
            if placement_group_table(pg).get("state", "REMOVED") != "REMOVED":
                remove_placement_group(pg)
                removed += 1
        except Exception:
            pass
    return removed
