"""Sweep a job over config keys with Ray Tune: each trial is that job's training run (Ray Train +
DeepSpeed), each a nested MLflow run under one parent run that gets the results table and plots.

    python jobs/sweep.py --preset smoke                                  # 4 tiny trials, a few minutes on a laptop
    python jobs/sweep.py --job lm_wikitext --preset paper                # memory {0,1,5,10,25} x unroll {0,1,2,4}
    python jobs/sweep.py --search memory.kind=xl,rmt,rmt_xl --search train.lr=loguniform:1e-4:1e-2 --num-samples 4
    python jobs/sweep.py --grid wt103_seg50 --preset smoke --train.max_steps 200   # a paper table at your scale
    ray job submit --working-dir . -- python jobs/sweep.py --preset paper --scaling.use_gpu true

Rerunning the same command (same --name and --storage.path) resumes an interrupted sweep. `--help` lists
every flag and config key.
"""

import sys

from rmt_dist.sweep import main

if __name__ == "__main__":
    sys.exit(main())
