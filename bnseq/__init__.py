"""bnseq: batch normalization in the right place, by construction, for Keras 3."""

__version__ = "0.1.0"

from bnseq.convert import batch_normalize
from bnseq.lint import Finding
from bnseq.lint import lint
from bnseq.rules import BatchNormPlacementWarning
from bnseq.sequential import Sequential
from bnseq.sequential import with_batch_norm
from bnseq.sequential import without_batch_norm

__all__ = [
    "BatchNormPlacementWarning",
    "Finding",
    "Sequential",
    "batch_normalize",
    "lint",
    "with_batch_norm",
    "without_batch_norm",
]
