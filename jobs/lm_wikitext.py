"""Train on the lm_wikitext workload with Ray Train + DeepSpeed; track it in MLflow.

    python jobs/lm_wikitext.py --preset smoke                       # local Ray, local MLflow (sqlite:///mlflow.db)
    ray job submit --working-dir . -- python jobs/lm_wikitext.py --preset paper --scaling.num_workers 16

Dotted overrides follow the preset (`--memory.num_tokens 10 --memory.bptt_unroll 2`); `--help` lists them.
"""

import sys

from rmt_dist.cli import run_job
from rmt_dist.presets import PRESETS

if __name__ == "__main__":
    sys.exit(run_job("lm_wikitext", PRESETS["lm_wikitext"]))
