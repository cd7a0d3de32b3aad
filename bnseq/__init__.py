"""bnseq: batch normalization in the right place, by construction, for Keras 3."""

__version__ = "0.5.0"

from bnseq import callbacks
from bnseq.convert import batch_normalize
from bnseq.export import ExportReport
from bnseq.export import ToleranceError
from bnseq.export import export
from bnseq.fold import FoldDecision
from bnseq.fold import fold
from bnseq.fold import fold_report
from bnseq.fold import fold_with_report
from bnseq.layers import BatchNormalization
from bnseq.lint import Finding
from bnseq.lint import lint
from bnseq.marks import with_batch_norm
from bnseq.marks import without_batch_norm
from bnseq.notices import BatchNormPlacementWarning
from bnseq.notices import PlatformWarning
from bnseq.recalibrate import Recalibration
from bnseq.recalibrate import RecalibrationReport
from bnseq.recalibrate import recalibrate
from bnseq.sequential import Sequential

__all__ = [
    "BatchNormPlacementWarning",
    "BatchNormalization",
    "ExportReport",
    "Finding",
    "FoldDecision",
    "PlatformWarning",
    "Recalibration",
    "RecalibrationReport",
    "Sequential",
    "ToleranceError",
    "batch_normalize",
    "callbacks",
    "export",
    "fold",
    "fold_report",
    "fold_with_report",
    "lint",
    "recalibrate",
    "with_batch_norm",
    "without_batch_norm",
]
