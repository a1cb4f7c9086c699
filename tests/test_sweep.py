"""Sweeps (rmt_dist.sweep, jobs/sweep.py, rmt_dist.report): flags and grids, the baseline row, the
Pareto frontier and the report on fixed tables; then real Ray Tune + Train + DeepSpeed + MLflow runs:
the smoke sweep interrupted and resumed, and ASHA stopping a trial, a failed trial, and the trial after
both still getting its workers (ray#54305)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from rmt_dist import report as R
from rmt_dist.sweep import flags, paper_grids, runner, space
from rmt_dist.config import ConfigError


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "sweep.py"), *args]


def sweep_env() -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------------------------------ flags

def test_search_flags_parse_to_grids_and_ranges():
    assert space.parse_search("memory.num_tokens=1,5,10") == space.Dim("memory.num_tokens", "grid", values=(1, 5, 10))
    assert space.parse_search("memory.kind=xl,rmt,rmt_xl").values == ("xl", "rmt", "rmt_xl")
    lr = space.parse_search("train.lr=loguniform:1e-4:1e-2")
    assert (lr.kind, lr.low, lr.high) == ("loguniform", 1e-4, 1e-2)
    assert space.parse_search("memory.bptt_unroll=randint:0:4").ends() == [0, 4]
    assert space.parse_search("train.seed=choice:1,2").kind == "choice"
    for text, message in [
        ("memory.foo=1", "unknown config key 'memory.foo' in --search"),
        ("memory.num_tokens=1,x", "memory.num_tokens must be an integer, got 'x'"),
        ("train.lr=loguniform:0:1", "loguniform needs LOW > 0"),
        ("train.lr=uniform:2:1", "LOW must be < HIGH"),
        ("memory.num_tokens=uniform:1:5", "uniform needs a float key"),
        ("storage.path=a,b", "set once per sweep"),
        ("memory.num_tokens", "--search must look like"),
        ("memory.num_tokens=1,1", "listed twice"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            space.parse_search(text)


def test_memory_size_zero_is_the_baseline_row_and_runs_once():
    spec = flags.parse_sweep_args(["--preset", "smoke"])
    assert spec.num_trials == 4 and spec.dropped == 2  # {0,4} x {0,1,2}: the baseline once, not 3 times
    assert [p["label"] for p in spec.points] == ["none (0, 0)", "rmt (4, 0)", "rmt (4, 1)", "rmt (4, 2)"]
    assert spec.points[0]["overrides"]["memory.kind"] == "none"
    assert (spec.metric, spec.mode) == ("val_ppl", "min")

    default = flags.parse_sweep_args(["--preset", "smoke", "--search", "memory.num_tokens=0,1,5,10,25",
                                      "--search", "memory.bptt_unroll=0,1,2,4"])
    assert default.num_trials == 17  # 5 x 4 grid points, memory 0 once
    xl = flags.parse_sweep_args(["--search", "memory.kind=rmt_xl", "--search", "memory.num_tokens=0,2",
                                 "--memory.xl_len", "4"])
    assert [p["label"] for p in xl.points] == ["xl (4, 1)", "rmt_xl (4+2, 1)"]  # rmt_xl with no tokens is xl
    mixed = flags.parse_sweep_args(["--job", "algorithmic", "--search", "memory.kind=none,rmt",
                                    "--search", "train.lr=loguniform:1e-4:1e-2", "--num-samples", "3"])
    assert mixed.num_trials == 6 and mixed.metric == "val_acc" and mixed.mode == "max"


@pytest.mark.parametrize("args, message", [
    (["--search", "memory.foo=1"], "unknown config key 'memory.foo' in --search (see --help for the keys)"),
    (["--search", "memory.kind=xl,rmt"],
     "memory.xl_len must be >= 1 for memory.kind=xl, got 0 (search point memory.kind=xl)"),
    (["--grid", "wt103_seg150", "--search", "memory.num_tokens=1,2"],
     "memory.num_tokens is set by the rows of --grid wt103_seg150 (keys: memory.bptt_unroll, "
     "memory.kind, memory.num_tokens, memory.xl_len); drop it or sweep without --grid"),
    (["--scheduler", "hyperband"], "--scheduler must be one of none, asha, got 'hyperband'"),
])
def test_bad_sweep_input_is_one_line_and_exit_2_before_ray(args, message, tmp_path):
    proc = subprocess.run(sweep_cmd(*args), cwd=tmp_path, env=sweep_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_paper_grids_expand_to_valid_trials_beside_the_published_figures():
    counts = {"wt103_seg150": 17, "wt103_seg50": 22, "enwik8_seg128": 14, "copy_segments": 7, "reverse_segments": 4}
    for name, count in counts.items():
        spec = flags.parse_sweep_args(["--grid", name, "--preset", "smoke"])
        assert spec.num_trials == count, name
        assert spec.metric == paper_grids.GRIDS[name].metric
        assert all(p["paper_row"] and p["paper_value"] > 0 for p in spec.points), name
    seg150 = {p["paper_row"]: p for p in flags.parse_sweep_args(["--grid", "wt103_seg150", "--preset", "smoke"]).points}
    assert seg150["Baseline"]["overrides"]["memory.kind"] == "none" and seg150["Baseline"]["paper_value"] == 29.95
    assert seg150["RMT 10 BPTT 2"]["overrides"]["memory.bptt_unroll"] == 2
    assert seg150["RMT 10 BPTT 2"]["paper_value"] == 25.32
    assert seg150["Tr-XL + RMT 150+10 BPTT 3, 2x steps"]["overrides"]["train.max_steps"] == 40  # smoke: 20 steps
    copy = {p["paper_row"]: p["overrides"] for p in flags.parse_sweep_args(["--grid", "copy_segments"]).points}
    row = copy["copy 120 / 6 segments, RMT"]
    assert (row["data.task_length"], row["data.segment_len"], row["data.num_segments"]) == (120, 60, 6)
    # The grid's base keys are scalable, its row keys are not.
    assert flags.parse_sweep_args(["--grid", "wt103_seg50", "--data.segment_len", "16"]).base["data.segment_len"] == 16
    with pytest.raises(ConfigError, match="--job must be lm_enwik8 for --grid enwik8_seg128"):
        flags.parse_sweep_args(["--grid", "enwik8_seg128", "--job", "lm_wikitext"])


# -------------------------------------------------------------------------------- table, frontier, plots

def test_pareto_frontier_on_a_fixed_table():
    #          x (memory)  y (metric)
    points = [(10.0, 30.0),  # 0: on the front (least memory)
              (20.0, 25.0),  # 1: on the front
              (20.0, 26.0),  # 2: same memory as 1, worse
              (25.0, 27.0),  # 3: more memory and worse than 1: dominated
              (40.0, 24.0),  # 4: on the front (best metric)
              (50.0, 24.0),  # 5: equal metric, more memory: dominated
              (10.0, 30.0)]  # 6: duplicate of 0: not a second front point
    assert R.pareto_front(points, "min") == [0, 1, 4]
    accuracy = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.9), (4.0, 0.95), (5.0, 0.95)]
    assert R.pareto_front(accuracy, "max") == [0, 2, 3]
    assert R.pareto_front([], "min") == []


def fixed_records() -> list[R.TrialRecord]:
    def rec(tid, kind, m, xl, k, status, best, peak, state, paper=None, error=""):
        curve = [] if best is None else [(10, best * 1.5), (20, best)]
        return R.TrialRecord(trial_id=tid, kind=kind, num_tokens=m, xl_len=xl, bptt_unroll=k, status=status,
                             metric="val_ppl", best=best, peak_mem_bytes=peak, memory_state_bytes=state,
                             tokens_per_s=1000.0, curve=curve, swept={"memory.num_tokens": m, "train.lr": 1e-3},
                             paper_row=f"row {tid}" if paper else None, paper_value=paper, error=error)

    return [rec("t0", "none", 0, 0, 0, "done", 40.0, 100 * 2**20, 0, paper=39.05),
            rec("t1", "rmt", 10, 0, 2, "done", 30.0, 120 * 2**20, 2560, paper=26.62),
            rec("t2", "rmt", 10, 0, 0, "stopped", 35.0, 110 * 2**20, 2560, paper=30.69),
            rec("t3", "xl", 0, 25, 0, "done", 28.0, 150 * 2**20, 12800, paper=27.57),
            rec("t4", "rmt", 25, 0, 4, "failed", None, None, None, paper=None, error="rank 0: OutOfMemoryError")]


def test_table_and_plots_from_a_fixed_table(tmp_path):
    import matplotlib.image as mpimg

    records = fixed_records()
    rows = list(csv.DictReader(io.StringIO(R.to_csv(records, "min"))))
    assert [r["trial"] for r in rows] == ["t3", "t1", "t2", "t0", "t4"]  # best first, failed last
    assert rows[0]["memory"] == "25" and rows[0]["kind"] == "xl" and rows[0]["status"] == "done"
    assert float(rows[1]["diff"]) == pytest.approx(30.0 - 26.62)
    assert rows[4]["status"] == "failed" and rows[4]["error"] == "rank 0: OutOfMemoryError"
    assert {"train.lr", "paper_val_ppl", "peak_mem_bytes", "memory_state_bytes", "tokens_per_s"} <= set(rows[0])
    text = R.to_text(records, "min").splitlines()
    assert text[0].split()[:4] == ["trial", "kind", "memory", "unroll"] and text[1].startswith("t3")
    assert "| t1 | rmt | 10 | 2 |" in R.to_markdown(records, "min")
    assert [r.trial_id for r in R.frontier(records, "peak_mem_bytes", "min")] == ["t0", "t2", "t1", "t3"]
    assert [r.trial_id for r in R.frontier(records, "memory_state_bytes", "min")] == ["t0", "t1", "t3"]

    files = R.write_report(records, "min", tmp_path, "fixed")
    assert sorted(f.name for f in files) == ["curves.png", "results.csv", "results.md", "tradeoff.png"]
    for name in ("tradeoff.png", "curves.png"):
        image = mpimg.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0.01


# ----------------------------------------------------------------------------------------- real sweeps

def read_results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_smoke_sweep_interrupted_then_resumed_logs_parent_children_and_plots(tmp_path, mlflow_server, data_cache):
    """`jobs/sweep.py --preset smoke` (4 trials, one at a time): Ctrl-C in the second trial after its first
    evaluation; the rerun runs only trials 2-4, trial 2 from its step-10 checkpoint; MLflow ends with one
    parent (search space, best trial, table, PNG plots) and 4 children with their params and metrics."""
    import mlflow

    experiment = "test_sweep_smoke"
    args = ["--preset", "smoke", "--name", "smoke1", "--max-concurrent", "1", "--storage.path", str(tmp_path / "runs"),
            "--data.cache_dir", data_cache, "--mlflow.tracking_uri", mlflow_server, "--mlflow.experiment", experiment]
    first = subprocess.Popen(sweep_cmd(*args), cwd=tmp_path, env=sweep_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    seen = []
    for line in first.stdout:
        seen.append(line)
        if "_00001 " in line and "step 10/20" in line:
            first.send_signal(signal.SIGINT)
            break
    out, err = first.communicate(timeout=240)
    assert first.returncode == 130, "".join(seen) + out + err
    assert "interrupted with 1 of 4 trials finished" in err

    sweep_dir = tmp_path / "runs" / "smoke1"
    trials = sorted(p for p in (sweep_dir / "tune").iterdir() if p.name.startswith("trial_"))
    finished, interrupted = trials[0], trials[1]
    finished_rows = read_results(finished)
    assert [r["step"] for r in finished_rows] == [10, 20]
    assert json.loads((sweep_dir / "ended_trials.json").read_text()) == {finished.name[6:]: "done"}
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    [parent] = client.search_runs([exp.experiment_id], filter_string=f"tags.`{R.ROLE_TAG}` = 'parent'")
    assert parent.info.status == "KILLED"
    finished_run = client.search_runs([exp.experiment_id], filter_string=f"tags.`{R.TRIAL_TAG}` = '{finished.name[6:]}'")[0]

    second = subprocess.run(sweep_cmd(*args), cwd=tmp_path, env=sweep_env(), capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming" in second.stdout.splitlines()[0]
    assert f"trial {finished.name[6:]} " not in second.stdout  # the finished trial did not run again
    assert read_results(finished) == finished_rows
    assert [r["step"] for r in read_results(interrupted)][-1] == 20

    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get(R.ROLE_TAG) == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 5 and len(children) == 4
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.memory.num_tokens"] == "0,4"
    assert parent.data.params["search.memory.bptt_unroll"] == "0,1,2"
    assert parent.data.tags["rmt_dist.best_trial"] in {c.data.tags[R.TRIAL_TAG] for c in children}
    assert "best_val_ppl" in parent.data.metrics
    kinds = sorted((c.data.params["memory.kind"], c.data.params["memory.num_tokens"],
                    c.data.params["memory.bptt_unroll"]) for c in children)
    assert kinds == [("none", "0", "0"), ("rmt", "4", "0"), ("rmt", "4", "1"), ("rmt", "4", "2")]
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"train_loss", "val_ppl", "peak_mem_bytes", "memory_state_bytes", "tokens_per_s"} <= set(
            child.data.metrics)
        assert child.data.params["scaling.num_workers"] == "1"
        expected_state = 0 if child.data.params["memory.kind"] == "none" else 4 * 64 * 4
        assert child.data.metrics["memory_state_bytes"] == expected_state
    # The interrupted trial resumed from its step-10 checkpoint: one evaluation at 10, one at 20, same run.
    resumed = next(c for c in children if c.data.tags[R.TRIAL_TAG] == interrupted.name[6:])
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "val_ppl")] == [10, 20]
    assert client.get_run(finished_run.info.run_id).info.end_time == finished_run.info.end_time

    import matplotlib.image as mpimg

    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.md", "tradeoff.png", "curves.png", "search_space.json"} <= names
    local = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "artifacts")))
    for name in ("tradeoff.png", "curves.png"):
        assert mpimg.imread(local / name).shape[0] > 300
    table = list(csv.DictReader((local / "results.csv").open()))
    assert len(table) == 4 and all(r["status"] == "done" for r in table)
    values = [float(r["best_val_ppl"]) for r in table]
    assert values == sorted(values)

    shell = subprocess.run([sys.executable, "-m", "rmt_dist.report", "--experiment", experiment,
                            "--tracking-uri", mlflow_server], cwd=tmp_path, env=sweep_env(), capture_output=True,
                           text=True, timeout=120)
    assert shell.returncode == 0, shell.stderr
    lines = shell.stdout.splitlines()
    assert lines[0].startswith("sweep smoke1 ") and "4 trials, 4 done" in lines[0]
    assert [ln.split()[0] for ln in lines[2:6]] == [r["trial"] for r in table]


@pytest.mark.slow
def test_asha_stops_a_trial_a_failed_trial_is_recorded_and_the_next_trials_get_their_workers(
        tmp_path, mlflow_server, data_cache, ray_local, monkeypatch):
    """One trial at a time on 2 CPUs (driver + worker): the first trial's worker dies at step 1 (failed, the
    sweep goes on), the second runs out, ASHA stops the third (learning rate 1e-7) at its first
    evaluation, and the fourth must still get a worker: the stopped trial's reservation was given back."""
    import mlflow
    import ray

    monkeypatch.setenv("RMT_DIST_FAULT_AT_STEP", f"1:0:{tmp_path / 'fault-marker'}")
    spec = flags.parse_sweep_args([
        "--preset", "smoke", "--name", "asha1", "--scheduler", "asha", "--search", "train.lr=0.003,0.01,1e-7,0.005",
        "--train.max_steps", "6", "--train.eval_interval", "2", "--train.warmup_steps", "0",
        "--storage.path", str(tmp_path / "runs"), "--data.cache_dir", data_cache,
        "--mlflow.tracking_uri", mlflow_server, "--mlflow.experiment", "test_sweep_asha"])
    flags.prepare(spec)
    free_before = ray.available_resources().get("CPU")
    outcome = runner.run_sweep(spec)

    assert not outcome.interrupted
    status = {r.swept["train.lr"]: r for r in outcome.records}
    assert status[0.003].status == "failed" and status[0.003].error.startswith("rank 0: worker process died")
    assert status[0.01].status == "done" and [s for s, _ in status[0.01].curve] == [2, 4, 6]
    # Stopped at its first evaluation (the abort may let it log one more before its workers go).
    assert status[1e-7].status == "stopped" and status[1e-7].curve[0][0] == 2 and len(status[1e-7].curve) <= 2
    assert status[0.005].curve, "the trial after the stopped one never got its worker"
    assert status[0.005].status in ("done", "stopped")
    deadline = time.time() + 30  # nothing left reserved (placement groups go away asynchronously)
    while ray.available_resources().get("CPU") != free_before and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == free_before == 2.0

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    children = {float(c.data.params["train.lr"]): c for c in client.search_runs(
        [client.get_experiment_by_name("test_sweep_asha").experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")}
    assert len(children) == 4
    assert children[0.003].info.status == "FAILED"
    assert children[0.003].data.tags[R.ERROR_TAG].startswith("rank 0: worker process died")
    assert children[1e-7].info.status == "FINISHED" and children[1e-7].data.tags[R.STOPPED_TAG] == "true"
    assert children[0.01].info.status == "FINISHED" and R.STOPPED_TAG not in children[0.01].data.tags
    records, metric, mode = R.records_from_mlflow(client, client.get_run(outcome.parent_run_id))
    assert sorted((r.trial_id, r.status) for r in records) == sorted((r.trial_id, r.status) for r in outcome.records)
