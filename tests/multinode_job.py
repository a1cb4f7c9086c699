"""Run by tests/test_multinode.py in its own process: a two-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``, 127.0.0.1, token auth), 2 workers forced onto different nodes,
DeepSpeed ZeRO-2 over gloo, checkpoints, then a resume. Prints one JSON line with what it saw."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from rmt_dist.config import from_flat
from rmt_dist.presets import PRESETS
from rmt_dist.train.driver import run_training


def main(workdir: str, data_cache: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]

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
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
