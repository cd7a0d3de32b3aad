"""Building by `add()`: bnseq against the same layers added by hand to keras.Sequential.

A model of N units of `Dense(16, activation="relu")`: bnseq adds each unit in
one `add()` (Dense, BatchNormalization, Activation); by hand, the same 3N
layers are three `add()` calls each. Keras rebuilds the whole graph on every
`add()`; bnseq extends the graph it already has.
"""

import keras
from keras import layers

import bnseq
from benchmarks import common


def build_bnseq(units):
    keras.backend.clear_session()
    model = bnseq.Sequential([keras.Input((16,))], batch_norm=True)
    for _ in range(units):
        model.add(layers.Dense(16, activation="relu"))
    return model


def build_by_hand(units):
    keras.backend.clear_session()
    model = keras.Sequential([keras.Input((16,))])
    for _ in range(units):
        model.add(layers.Dense(16, use_bias=False))
        model.add(layers.BatchNormalization())
        model.add(layers.Activation("relu"))
    return model


def run(quick=False):
    # Keras's own build is quadratic: 600 layers (N=200) take over a minute
    # a run, so the comparison stops at N=100 and bnseq goes on alone.
    depths = (3, 6) if quick else (25, 50, 100, 200)
    compared = depths if quick else (25, 50, 100)
    rounds = 1 if quick else 3
    a, b = build_bnseq(depths[0]), build_by_hand(depths[0])
    assert a.count_params() == b.count_params()
    rows, results = [], []
    for units in depths:
        candidates = {"bnseq": lambda u=units: build_bnseq(u)}
        if units in compared:
            candidates["keras"] = lambda u=units: build_by_hand(u)
        times = common.interleaved(candidates, rounds=rounds, warmup=0)
        ours = common.median(times["bnseq"])
        theirs = common.median(times["keras"]) if "keras" in times else None
        results.append({"units": units, "layers": 3 * units, "bnseq": times["bnseq"], "keras": times.get("keras")})
        rows.append(
            [
                units,
                3 * units,
                common.spread(times["bnseq"], unit=1, digits=2),
                common.spread(times["keras"], unit=1, digits=2) if theirs else "not run",
                f"{ours / theirs:.3f}" if theirs else "",
                f"{ours / units * 1000:.1f}",
                f"{theirs / units * 1000:.1f}" if theirs else "",
            ]
        )
    header = ["units N", "layers", "bnseq s", "keras s", "bnseq/keras", "bnseq ms/unit", "keras ms/unit"]
    return common.table(header, rows), results


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.5, 4))
    for name, style in (("keras", "o-"), ("bnseq", "s-")):
        points = [(r["layers"], common.median(r[name])) for r in results if r[name]]
        label = "keras.Sequential, 3 add() per unit" if name == "keras" else "bnseq.Sequential(batch_norm=True)"
        axes.plot(*zip(*points), style, label=label)
    axes.set_xlabel("layers in the model")
    axes.set_ylabel("seconds to build by add()")
    axes.set_title("Building N units of Dense(16) + BatchNormalization + ReLU")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
