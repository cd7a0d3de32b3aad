"""`bnseq.summary`: one row per BatchNormalization, with what `fit`, `fold` and `lint` will make of it.

`model.summary(show_trainable=True)` says whether a layer is `trainable`; for
a BatchNormalization that is not what decides its fate. This table puts, for
each one (inside traced subclassed layers too), where it is, its axis, the
mode it runs in under `fit` (`fine_tuning.mode_of`), what `fold` does with it
(`fold_plan.decide`) and lint's findings, all read from one walk of the model.
"""

import dataclasses
import textwrap

from bnseq import internals
from bnseq import kinds
from bnseq.deciding import findings as findings_module
from bnseq.deciding import fine_tuning
from bnseq.deciding import fold_plan
from bnseq.reading import files
from bnseq.reading import graph as graph_module
from bnseq.reading import holding


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One BatchNormalization in `bnseq.summary`.

    Attributes:
        batch_norm: str. Its name.
        path: str. The models and layers that hold it and its name, `/`-joined.
        axis: int or list of int. The axis it normalizes.
        under_fit: str. What `fit` does with it, with the cause (see
            `bnseq.lint`'s BN005 to BN008 for what can be wrong).
        trains_statistics: bool. Whether `fit` updates its moving statistics.
        fold: str. What `bnseq.fold` does with it: `"into <layer>"`,
            `"forward into <layer>"`, or `"kept: <why>"`.
        findings: tuple of str. Lint's codes for it, in lint's order.
    """

    batch_norm: str
    path: str
    axis: object
    under_fit: str
    trains_statistics: bool
    fold: str
    findings: tuple


class Summary(list):
    """A list of `SummaryRow` that prints as an aligned table, in the manner of `model.summary()`.

    Attributes:
        model: str. The model's name.
        lint: list of `bnseq.Finding`. The model's findings (also those of no
            single BatchNormalization, such as `BN000`).
    """

    WIDTHS = (44, 5, 38, 30, 12)

    def __init__(self, rows=(), model="", lint=()):
        super().__init__(rows)
        self.model = model
        self.lint = list(lint)

    def __str__(self):
        header = ("BatchNormalization", "axis", "under fit", "fold", "lint")
        body = [(row.path, str(row.axis), row.under_fit, row.fold, " ".join(row.findings) or "-") for row in self]
        widths = [
            min(limit, max(len(line[index]) for line in [header, *body]))
            for index, limit in enumerate(self.WIDTHS)
        ]
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        lines = [f'BatchNormalization in model "{self.model}"', rule, _line(header, widths), rule]
        for line in body:
            lines.extend(_wrapped(line, widths))
        lines.append(rule)
        training = sum(row.trains_statistics for row in self)
        folded = sum(not row.fold.startswith("kept") for row in self)
        lines.append(
            f"BatchNormalization: {len(self)}; training statistics in fit: {training}; folding: {folded}; "
            f"lint findings: {len(self.lint)}"
        )
        return "\n".join(lines)


def summary(model_or_path, *, safe_mode=True, batch_size=None):
    """A table of every BatchNormalization: where it is, its axis, its mode under `fit`, its fold, its findings.

    Never changes the model. The mode is what the next `fit` will do, which
    `trainable` alone does not say: frozen by its own `trainable` or by a
    model holding it, a `bnseq.freeze` of one part, inference because of a
    recorded `training=False` (or training statistics, where this Keras
    overrides it: BN005), or a compiled train step that has not seen the last
    change of `trainable` (BN006).

    Args:
        model_or_path: `keras.Model`, or the path of a `.keras` file.
        safe_mode: bool. Keras's `safe_mode` for loading a file.
        batch_size: int, optional. The batch size `fit` will use (for BN008).

    Returns:
        `Summary`: `print` it for the table; iterate it for `SummaryRow`s.

    Examples:
        >>> model = keras.Sequential([
        ...     keras.Input((4,)),
        ...     keras.layers.Dense(3, use_bias=False, name="d"),
        ...     keras.layers.BatchNormalization(name="bn"),
        ... ], name="tiny")
        >>> [(row.path, row.under_fit, row.fold) for row in bnseq.summary(model)]
        [('tiny/bn', 'trains statistics', 'into d')]
    """
    model = files.as_model(model_or_path, safe_mode=safe_mode)
    graph = graph_module.walk(model)
    context = fine_tuning.Context(model)
    found = findings_module.lint_graph(model, graph, context, batch_size=batch_size)
    by_layer = {}
    for finding in found:
        by_layer.setdefault(finding.layer, []).append(finding.code)
    folds = {id(bn): decision for bn, _, decision, _ in fold_plan.decide(graph)}
    for unit in graph.layers:  # a QuantizedLinear folds its own BatchNormalization (quantize_aware)
        if kinds.reads_as_leaf(unit):
            for inner in internals.inner_layers(unit):
                folds.setdefault(id(inner), f"into {unit.name} on export (quantize-aware)")
    with_paths = holding.batch_norms_with_paths(model)
    paths = {id(layer): "/".join(path) for layer, path in with_paths}
    order = {id(layer): layer for layer in graph.flat.batch_norms()}
    for layer, _ in with_paths:
        order.setdefault(id(layer), layer)
    rows = []
    for layer in order.values():
        mode = fine_tuning.mode_of(layer, context)
        rows.append(
            SummaryRow(
                batch_norm=layer.name,
                path=paths.get(id(layer), layer.name),
                axis=layer.axis,
                under_fit=mode.text,
                trains_statistics=mode.statistics,
                fold=_fold(folds.get(id(layer))),
                findings=tuple(by_layer.get(layer.name, ())),
            )
        )
    return Summary(rows, model=model.name, lint=found)


def _fold(decision):
    if decision is None:
        return "kept: fold does not reach it"
    if isinstance(decision, str):
        return decision
    if decision.folded and decision.into is not None:
        across = "" if decision.through is None else f", across {decision.through}"
        return f"forward into {decision.into}{across}"
    if decision.folded and decision.through is not None:
        return f"into {decision.producer}, moved before {decision.through}"
    if decision.folded:
        return f"into {decision.producer}"
    return f"kept: {decision.reason}"


def _line(cells, widths):
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()


def _wrapped(cells, widths):
    """One table row as lines, each cell wrapped to its column's width."""
    columns = [textwrap.wrap(cell, width) or [""] for cell, width in zip(cells, widths)]
    height = max(len(column) for column in columns)
    return [
        _line([column[index] if index < len(column) else "" for column in columns], widths)
        for index in range(height)
    ]
