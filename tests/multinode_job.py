"""Run by tests/test_multinode.py in its own process against the two-node cluster that the test
started (RAY_ADDRESS): 2 workers forced onto different nodes (STRICT_SPREAD), DeepSpeed ZeRO-2 over
gloo, checkpoints, then a resume. Prints one JSON line with what it saw."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import ray

from rmt_dist.config import from_flat
from rmt_dist.presets import PRESETS
from rmt_dist.train.driver import run_training


def main(workdir: str, data_cache: str) -> None:
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    deadline = time.time() + 120
    while len(nodes := [n["NodeID"] for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
        time.sleep(1)  # the second node is still joining
    flat = {**PRESETS["lm_wikitext"]["smoke"], "data.cache_dir": data_cache, "storage.path": f"{workdir}/runs",
            "storage.run_name": "multinode", "mlflow.enabled": False, "deepspeed.zero_stage": 2,
            "scaling.num_workers": 2, "scaling.placement_strategy": "STRICT_SPREAD",
            "train.max_steps": 4, "train.eval_interval": 2, "train.eval_batches": 1}
    first = run_training(from_flat(flat), "test_multinode")
    manifests = [json.loads(p.read_text()) for p in sorted(Path(first.checkpoint).glob("manifest_rank*.json"))]
    resumed = run_training(from_flat({**flat, "train.max_steps": 6}), "test_multinode")
    print(json.dumps({"nodes": nodes, "writer_nodes": [m["node_id"] for m in manifests],
                      "first_step": first.metrics["step"], "resumed_step": resumed.metrics["step"],
                      "first_val_loss": first.metrics["val_loss"], "resumed_val_loss": resumed.metrics["val_loss"]}))
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
