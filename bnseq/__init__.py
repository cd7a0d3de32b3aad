"""bnseq: batch normalization in the right place, by construction, for Keras 3."""

__version__ = "0.1.0"

from bnseq.rules import BatchNormPlacementWarning
from bnseq.sequential import Sequential
from bnseq.sequential import with_batch_norm
from bnseq.sequential import without_batch_norm

__all__ = [
    "BatchNormPlacementWarning",
    "Sequential",
    "with_batch_norm",
    "without_batch_norm",
]
