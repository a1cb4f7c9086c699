"""rmt-dist: distributed training of memory-augmented transformers (RMT first) on Ray + DeepSpeed."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``rmt_dist.generate``, imported on first use (the package itself stays light for the jobs' flags)."""
    if name == "generate":
        from rmt_dist.model.generate import generate

        return generate
    raise AttributeError(f"module 'rmt_dist' has no attribute {name!r}")
