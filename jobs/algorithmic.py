"""Train on the paper's algorithmic tasks (--data.task copy|reverse|assoc|quadratic|sort) with Ray Train + DeepSpeed; track it in MLflow.

    python jobs/algorithmic.py --preset smoke                       # local Ray, local MLflow (sqlite:///mlflow.db)
    ray job submit --working-dir . -- python jobs/algorithmic.py --preset paper --scaling.num_workers 16

Dotted overrides follow the preset (`--memory.num_tokens 10 --memory.bptt_unroll 2`); `--help` lists them.
"""

import sys

from rmt_dist.cli import run_job
from rmt_dist.presets import PRESETS

if __name__ == "__main__":
    sys.exit(run_job("algorithmic", PRESETS["algorithmic"], aliases={"task": "data.task"}))
