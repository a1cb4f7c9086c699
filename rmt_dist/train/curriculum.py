"""``train.curriculum``: train on 1 segment first, then grow the segment count up to ``data.num_segments``
(the 1M-token paper's curriculum): at scheduled steps (``steps:200,400``) or after each evaluation whose
``val_acc`` reaches a threshold (``acc:0.9``)."""

from __future__ import annotations

from rmt_dist.config import Config, parse_curriculum


class Curriculum:
    def __init__(self, cfg: Config) -> None:
        self.spec = parse_curriculum(cfg.train.curriculum)
        self.max_segments = cfg.data.num_segments
        self.segments = 1 if self.spec else self.max_segments

    def update(self, step: int, val_acc: float | None = None) -> bool:
        """Advance after ``step`` (and its evaluation, if ``val_acc`` is given); returns whether it grew."""
        if self.spec is None:
            return False
        kind, arg = self.spec
        if kind == "steps":
            target = 1 + sum(step >= s for s in arg)
        else:
            target = self.segments + int(val_acc is not None and val_acc >= arg)
        grown = min(max(target, self.segments), self.max_segments)
        changed, self.segments = grown != self.segments, grown
        return changed
