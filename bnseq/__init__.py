"""bnseq: batch normalization in the right place, by construction, for Keras 3."""

__version__ = "0.1.0"

from bnseq.convert import batch_normalize
from bnseq.fold import FoldDecision
from bnseq.fold import fold
from bnseq.fold import fold_report
from bnseq.lint import Finding
from bnseq.lint import lint
from bnseq.notices import BatchNormPlacementWarning
from bnseq.notices import PlatformWarning
from bnseq.sequential import Sequential
from bnseq.sequential import with_batch_norm
from bnseq.sequential import without_batch_norm

__all__ = [
    "BatchNormPlacementWarning",
    "Finding",
    "FoldDecision",
    "PlatformWarning",
    "Sequential",
    "batch_normalize",
    "fold",
    "fold_report",
    "lint",
    "with_batch_norm",
    "without_batch_norm",
]
