"""Tracing keras-hub backbones whose BatchNormalization lives in subclassed blocks.

For each backbone of tests/backbones.py (tiny sizes, random statistics):
how many BatchNormalization layers it has and how many fold, why the others
are kept, the fold's largest relative output difference under `predict`,
recalibrate's largest difference from each layer's own input statistics
(captured independently in one inference call), its passes of work, and the
seconds the first reading of the model (tracing every block, each trace
checked on a random input) and then `fold` take. One run each; the times are
single figures on a shared machine, to show the order of magnitude.
"""

import time

import numpy as np

SAMPLES = 32


def run(quick=False):
    try:
        import keras_hub  # noqa: F401

        from tests.backbones import BACKBONES
        from tests.backbones import statistics_errors
    except ImportError:
        return "| backbone |\n|---|\n| keras-hub is not installed |", []
    import bnseq
    from bnseq.reading import graph
    from tests.test_fold import randomize_statistics

    names = ["efficientnet_v2_blocks"] if quick else sorted(BACKBONES)
    rows = []
    for name in names:
        model = BACKBONES[name]()
        randomize_statistics(model, np.random.default_rng(0))
        start = time.perf_counter()
        walked = graph.walk(model)
        traced = time.perf_counter() - start
        start = time.perf_counter()
        folded, report = bnseq.fold_with_report(model)
        fold_seconds = time.perf_counter() - start
        x = np.random.default_rng(1).normal(0.5, 1.5, size=(4 if quick else SAMPLES, 32, 32, 3)).astype("float32")
        expected = [np.asarray(each) for each in _flat(model.predict(x[:8], verbose=0))]
        actual = [np.asarray(each) for each in _flat(folded.predict(x[:8], verbose=0))]
        error = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(expected, actual))
        recalibrated = bnseq.recalibrate(model, x, batch_size=8, verbose=0)
        statistics = max(statistics_errors(model, x).values())
        kept = {}
        for decision in report:
            if not decision.folded:
                reason = decision.reason.split(" '")[0] if "follows" in decision.reason else decision.reason
                kept[reason] = kept.get(reason, 0) + 1
        rows.append(
            {
                "backbone": name,
                "batch_norms": len(report),
                "folded": sum(decision.folded for decision in report),
                "kept": "; ".join(f"{count}: {reason}" for reason, count in kept.items()) or "none",
                "opaque": len(walked.opaque),
                "fold_error": error,
                "statistics_error": statistics,
                "passes": recalibrated.passes,
                "trace_seconds": traced,
                "fold_seconds": fold_seconds,
            }
        )
    lines = [
        "| backbone | BN | folded | kept, why | untraced blocks | fold error (predict) | recalibrate error "
        "| passes | trace s | fold s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['backbone']} | {row['batch_norms']} | {row['folded']} | {row['kept']} | {row['opaque']} | "
            f"{row['fold_error']:.1e} | {row['statistics_error']:.1e} | {row['passes']:.2f} | "
            f"{row['trace_seconds']:.2f} | {row['fold_seconds']:.2f} |"
        )
    return "\n".join(lines), rows


def _flat(outputs):
    import keras

    return keras.tree.flatten(outputs)
