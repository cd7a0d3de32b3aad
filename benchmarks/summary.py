"""`bnseq.summary` next to Keras's `model.summary(show_trainable=True)`, and what `freeze` costs.

For keras.applications models (built with `weights=None`): the seconds of
`bnseq.summary(model)` (a walk of the model, every BatchNormalization's mode
under fit, fold decision and lint codes) and of Keras's own summary printed to
nowhere, interleaved, medians over rounds; the first `bnseq.summary` of a fresh
model on its own; and one `bnseq.freeze` + `bnseq.unfreeze` of every
BatchNormalization of the compiled model. The goal of issue 30: ResNet50's
summary in under a second on 2 cores.
"""

import functools

import keras

from benchmarks import common


def run(quick=False):
    import bnseq

    names = ["MobileNetV2"] if quick else ["ResNet50", "MobileNetV2", "DenseNet121", "EfficientNetB0"]
    rounds = 2 if quick else 9
    rows, results = [], []
    for name in names:
        model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3) if quick else None)
        table, first = common.timed(functools.partial(bnseq.summary, model))
        times = common.interleaved(
            {
                "bnseq": functools.partial(bnseq.summary, model),
                "keras": functools.partial(model.summary, show_trainable=True, print_fn=_nowhere),
            },
            rounds=rounds,
        )
        model.compile(optimizer="adam", loss="mse")
        _, frozen = common.timed(functools.partial(_freeze_and_unfreeze, bnseq, model))
        results.append(
            {"model": name, "batch_norms": len(table), "first": first, "bnseq": times["bnseq"], "keras": times["keras"]}
        )
        rows.append(
            [
                name,
                len(table),
                f"{first * 1000:.0f}",
                common.spread(times["bnseq"]),
                common.spread(times["keras"]),
                f"{common.ratio(times['bnseq'], times['keras']):.2f}",
                f"{frozen * 1000:.0f}",
            ]
        )
    header = [
        "model",
        "BN",
        "first bnseq.summary ms",
        "bnseq.summary ms",
        "model.summary ms",
        "ratio",
        "freeze + unfreeze ms",
    ]
    return common.table(header, rows), results


def _nowhere(*args, **kwargs):
    pass


def _freeze_and_unfreeze(bnseq, model):
    bnseq.freeze(model)
    bnseq.unfreeze(model)
