"""Inference after folding: original, folded, and no BatchNormalization at all.

The no-BN model is the same architecture written without BatchNormalization:
the limit folding can reach. Each model runs `predict_on_batch` after a plain
`compile()` (Keras's default `jit_compile="auto"`), as a user would run it.
"""

import keras
import numpy as np
from keras import layers

import bnseq
from benchmarks import common


def mlp(batch_norm):
    stack = [
        keras.Input((784,)),
        layers.Dense(512, activation="relu"),
        layers.Dense(512, activation="relu"),
        layers.Dense(10),
    ]
    if batch_norm:
        return bnseq.Sequential(stack, batch_norm=True)
    return keras.Sequential(stack)


def convnet(batch_norm):
    stack = [
        keras.Input((32, 32, 3)),
        layers.Conv2D(32, 3, activation="relu"),
        layers.Conv2D(64, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(64, 3, activation="relu"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(10),
    ]
    if batch_norm:
        return bnseq.Sequential(stack, batch_norm=True)
    return keras.Sequential(stack)


def resnet50(batch_norm, input_shape=(224, 224, 3)):
    model = keras.applications.ResNet50(weights=None, input_shape=input_shape)
    if batch_norm:
        return model

    def skip_batch_norm(layer, *args, **kwargs):
        if isinstance(layer, layers.BatchNormalization):
            return args[0]
        return layer(*args, **kwargs)

    return keras.models.clone_model(model, call_function=skip_batch_norm)


def cases(quick):
    """(name, batch size, builder, input shape, rounds, calls per round)."""
    # Sub-millisecond calls are noisy on a shared machine: they get many
    # more calls per round.
    def sizes(rounds, calls):
        return (2, 1) if quick else (rounds, calls)

    resnet_shape = (224, 224, 3)
    yield ("MLP 784-512-512-10", 1, mlp, (784,), *sizes(30, 50))
    yield ("MLP 784-512-512-10", 64, mlp, (784,), *sizes(30, 20))
    yield ("convnet 3 conv", 1, convnet, (32, 32, 3), *sizes(30, 50))
    yield ("convnet 3 conv", 64, convnet, (32, 32, 3), *sizes(20, 5))
    if quick:  # ResNet50 is what takes the time; quick mode only checks that the benchmark runs
        return
    builder = lambda batch_norm: resnet50(batch_norm, resnet_shape)  # noqa: E731
    yield ("ResNet50", 1, builder, resnet_shape, *sizes(15, 3))
    yield ("ResNet50", 8, builder, resnet_shape, *sizes(12, 1))


def randomize_statistics(model, rng):
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))


def run(quick=False):
    """Measure every case; returns (markdown table, list of result dicts)."""
    rng = np.random.default_rng(0)
    rows, results = [], []
    for name, batch, build, shape, rounds, calls in cases(quick):
        keras.backend.clear_session()
        original = build(True)
        randomize_statistics(original, rng)
        folded = bnseq.fold(original)
        no_batch_norm = build(False)
        x = rng.standard_normal((batch, *shape)).astype("float32")
        models = {"original": original, "folded": folded, "no BN": no_batch_norm}
        for model in models.values():
            model.compile()
        expected = original.predict_on_batch(x)
        difference = float(np.max(np.abs(folded.predict_on_batch(x) - expected)))
        times = common.interleaved(
            {label: (lambda m=model, x=x: m.predict_on_batch(x)) for label, model in models.items()},
            rounds=rounds,
            calls=calls,
            warmup=2,
        )
        folded_to_original = common.ratio(times["folded"], times["original"])
        folded_to_plain = common.ratio(times["folded"], times["no BN"])
        results.append(
            {
                "model": name,
                "batch": batch,
                "times": times,
                "folded/original": folded_to_original,
                "folded/no BN": folded_to_plain,
                "max difference": difference,
            }
        )
        rows.append(
            [
                name,
                batch,
                common.spread(times["original"], digits=2),
                common.spread(times["folded"], digits=2),
                common.spread(times["no BN"], digits=2),
                f"{folded_to_original:.2f}",
                f"{folded_to_plain:.2f}",
                f"{difference:.1e}",
            ]
        )
    header = [
        "model",
        "batch",
        "original ms",
        "folded ms",
        "no BN ms",
        "folded/original",
        "folded/no BN",
        "max output diff",
    ]
    return common.table(header, rows), results
