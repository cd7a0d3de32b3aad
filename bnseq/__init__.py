"""bnseq: batch normalization in the right place, by construction, for Keras 3."""

__version__ = "0.5.0"

from bnseq import callbacks
from bnseq.changing.convert import batch_normalize
from bnseq.changing.folding import fold
from bnseq.changing.folding import fold_with_report
from bnseq.changing.freezing import FreezeReport
from bnseq.changing.freezing import FrozenBatchNormalization
from bnseq.changing.freezing import freeze
from bnseq.changing.freezing import unfreeze
from bnseq.changing.layers import BatchNormalization
from bnseq.changing.marks import with_batch_norm
from bnseq.changing.marks import without_batch_norm
from bnseq.changing.quantized_layers import ActivationQuantizer
from bnseq.changing.quantized_layers import QuantizedLinear
from bnseq.changing.quantizing import QuantizeAwareReport
from bnseq.changing.quantizing import quantize_aware
from bnseq.changing.quantizing import quantize_aware_with_report
from bnseq.changing.reparameterizing import reparameterize
from bnseq.changing.reparameterizing import reparameterize_with_report
from bnseq.changing.sequential import Sequential
from bnseq.deciding.branches import Reparameterization
from bnseq.deciding.branches import reparameterize_report
from bnseq.deciding.findings import Finding
from bnseq.deciding.findings import lint
from bnseq.deciding.fold_plan import FoldDecision
from bnseq.deciding.fold_plan import fold_report
from bnseq.deciding.overview import Summary
from bnseq.deciding.overview import SummaryRow
from bnseq.deciding.overview import summary
from bnseq.deciding.quantize_plan import QuantizeDecision
from bnseq.exporting.exporter import ExportReport
from bnseq.exporting.exporter import ToleranceError
from bnseq.exporting.exporter import export
from bnseq.notices import BatchNormPlacementWarning
from bnseq.notices import PlatformWarning
from bnseq.statistics.recalibration import Recalibration
from bnseq.statistics.recalibration import RecalibrationReport
from bnseq.statistics.recalibration import recalibrate

__all__ = [
    "ActivationQuantizer",
    "BatchNormPlacementWarning",
    "BatchNormalization",
    "ExportReport",
    "Finding",
    "FoldDecision",
    "FreezeReport",
    "FrozenBatchNormalization",
    "PlatformWarning",
    "QuantizeAwareReport",
    "QuantizeDecision",
    "QuantizedLinear",
    "Recalibration",
    "RecalibrationReport",
    "Reparameterization",
    "Sequential",
    "Summary",
    "SummaryRow",
    "ToleranceError",
    "batch_normalize",
    "callbacks",
    "export",
    "fold",
    "fold_report",
    "fold_with_report",
    "freeze",
    "lint",
    "quantize_aware",
    "quantize_aware_with_report",
    "recalibrate",
    "reparameterize",
    "reparameterize_report",
    "reparameterize_with_report",
    "summary",
    "unfreeze",
    "with_batch_norm",
    "without_batch_norm",
]
