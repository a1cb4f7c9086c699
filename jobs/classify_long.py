"""Long-document classification with a pretrained encoder (BERT, RoBERTa, DeBERTa) and recurrent memory
(the RMT paper's Hyperpartisan News setup); accuracy and macro F1 in MLflow.

    python jobs/classify_long.py --preset smoke --data.path docs.jsonl             # rows: {"text": ..., "label": ...}
    python jobs/classify_long.py --preset paper --data.path /data/hyperpartisan    # train.jsonl + valid.jsonl
    python jobs/classify_long.py --preset smoke --data.path docs.parquet --train.curriculum acc:0.9

`--data.path`: a JSONL/parquet file (split 90/10), a directory with train.* and valid.*, or a `datasets` hub name.
"""

import sys

from rmt_dist.cli import run_job
from rmt_dist.presets import PRESETS

if __name__ == "__main__":
    sys.exit(run_job("classify_long", PRESETS["classify_long"]))
