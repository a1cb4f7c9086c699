"""Sweeps (``jobs/sweep.py``): Ray Tune over the dotted config keys, one trial = one training run.

Ray Train V2 rejects ``Tuner(trainer)``, so each trial is a Tune function (``trial.run_trial``) that
builds the job's ``TorchTrainer`` itself and fits it. The param space is ``{"train_loop_config":
{point, random keys}, "sweep": {constants}}``, so a restored sweep runs with exactly its original config.

    flags.py        the command line and every check before Ray (exit code 2 on bad input)
    space.py        --search syntax, normalisation (memory size 0 = the baseline), grid expansion
    paper_grids.py  the paper's tables (paper_grids.json) as grids
    spec.py         SweepSpec: what a sweep runs
    runner.py       Ray, the Tuner (new or restored), the results table
    trial.py        one trial: its TorchTrainer, its error line
    callback.py     the driver's Tune callback: progress lines, stopped and failed trials
    cleanup.py      stopped trials give their workers back (ray#54305)
    mlflow_runs.py  the parent run and the trials' child runs
    layout.py       the sweep's files under storage.path/<sweep name>/
"""

from __future__ import annotations

import sys
from typing import Sequence

from rmt_dist import report as R
from rmt_dist.config import ConfigError, exit_on_config_error, from_flat
from rmt_dist.data import DataError
from rmt_dist.storage import whole_line
from rmt_dist.sweep.flags import parse_sweep_args, prepare
from rmt_dist.sweep.runner import run_sweep
from rmt_dist.tracking import tracking_uri


def main(argv: Sequence[str] | None = None) -> int:
    """``jobs/sweep.py``: flags -> checks (exit 2 on bad input) -> the sweep -> its table."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        spec = parse_sweep_args(argv)
        prepare(spec)
    except (ConfigError, DataError) as err:
        exit_on_config_error(ConfigError(str(err)))
    try:
        outcome = run_sweep(spec)
    except ConfigError as err:
        exit_on_config_error(err)
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command (--name {spec.name}) to resume", file=sys.stderr)
        return 130
    except Exception as err:
        print(f"error: sweep failed: {whole_line(err)}", file=sys.stderr)
        return 1
    finished = [r for r in outcome.records if r.status in ("done", "stopped", "failed")]
    if outcome.interrupted:
        print(f"interrupted with {len(finished)} of {spec.num_trials} trials finished: rerun the same command "
              f"(--name {spec.name}) to run the rest", file=sys.stderr)
        return 130
    print(R.to_text(outcome.records, spec.mode), end="")
    print(f"report: {outcome.report_dir} (results.csv, results.md, tradeoff.png, curves.png)")
    if outcome.parent_run_id:
        uri = tracking_uri(from_flat(spec.base))
        print(f"mlflow parent run: {outcome.parent_run_id} | see it: "
              + (uri if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}")
              + f" | table: python -m rmt_dist.report --experiment {spec.experiment_name()} --sweep {spec.name}")
    return 0 if any(r.status != "failed" for r in outcome.records) else 1
