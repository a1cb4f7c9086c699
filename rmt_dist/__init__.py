"""rmt-dist: distributed training of memory-augmented transformers (RMT first) on Ray + DeepSpeed."""

__version__ = "0.1.0"
