"""Continue training a pretrained causal LM (GPT-2, Llama, Mistral, Qwen, ...) with recurrent memory on a text corpus.

    python jobs/finetune_lm.py --preset smoke                                  # gpt2 on the smoke corpus
    python jobs/finetune_lm.py --preset paper --model.hf_name_or_path /models/gpt2 --data.path /data/wikitext-103-raw
    ray job submit --working-dir . -- python jobs/finetune_lm.py --preset paper --deepspeed.zero_stage 3

The corpus is read with the model's own tokenizer; `--storage.export_path DIR` saves the trained model
with its memory as a Hugging Face-style directory (`rmt_dist.model.from_pretrained`, `rmt_dist.generate`).
"""

import sys

from rmt_dist.cli import run_job
from rmt_dist.presets import PRESETS

if __name__ == "__main__":
    sys.exit(run_job("finetune_lm", PRESETS["finetune_lm"]))
