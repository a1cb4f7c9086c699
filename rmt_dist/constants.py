"""Values the data layer and the model agree on, in one place that both import.

It sits at the package's top level (like ``memory_kinds.py``), not under ``rmt_dist/data``: importing any
``rmt_dist.data.*`` module runs ``rmt_dist/data/__init__.py``, which loads ``datasets``, ``pyarrow`` and
``boto3`` (1.7 s here), and the torch-only model core must not pay that. The data layer never imports the
model. No torch here either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

IGNORE_INDEX = -100  # a label that takes no loss (torch's cross-entropy default)
PAD_ID = -1  # input_ids value of padding (backbones with supports_padding); never a token id
SPLITS = ("train", "valid", "test")  # a corpus's or task's splits, in this order

Segment = tuple["Tensor", "Tensor"]  # (input_ids [B, L], labels [B, L]), labels aligned (IGNORE_INDEX = no loss)
