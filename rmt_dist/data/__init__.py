"""Corpora, tokenizers, LM streams and the paper's algorithmic tasks (see each module's docstring).

    corpus = load_lm_corpus(cfg.data)        # .train/.valid/.test memory-mapped ids, .vocab_size, .metric
    streams = LMStreams(corpus.train, batch_size, world_size, rank, segment_len, num_segments)
    splits = load_task_splits(cfg.data)      # .train/.valid/.test datasets.Dataset, .vocab_size, .sample_len
    batches = task_batches(splits.train, batch_size, world_size, rank, epoch=0, shuffle=True)
"""

from rmt_dist.data.corpus import LMCorpus, load_lm_corpus
from rmt_dist.data.errors import DataError
from rmt_dist.data.streams import LMStreams
from rmt_dist.data.task_splits import TaskSplits, load_task_splits, num_task_batches, task_batches

__all__ = ["DataError", "LMCorpus", "LMStreams", "TaskSplits", "load_lm_corpus", "load_task_splits",
           "num_task_batches", "task_batches"]
