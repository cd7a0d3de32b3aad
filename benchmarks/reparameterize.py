"""A RepVGG-style network before and after `bnseq.reparameterize` (and `fold`), and D-FINE's blocks.

The network is a stem and stages of RepVGG blocks (3x3 conv + BN, 1x1 conv + BN
and, where the shape allows, a BN alone, summed, then ReLU), as the RepVGG paper
trains it. Three models run `predict_on_batch` after a plain `compile()`,
interleaved, medians over rounds: as trained, reparameterized (one 3x3
convolution per block), and reparameterized then folded (the stem's
BatchNormalization too). Their outputs are compared on the same batch.

For keras-hub's D-FINE the convolutions and BatchNormalization layers are
counted in a `DFineCSPRepLayer` (its RepVGG blocks trace) before and after,
and in a whole `DFineBackbone`, whose hybrid encoder does not trace (every
sum there is reported kept, with the reason).
"""

import functools

import keras
import numpy as np
from keras import layers

from benchmarks import common


def repvgg_block(x, filters, strides, name):
    channels = x.shape[-1]
    terms = [
        layers.BatchNormalization(name=f"{name}_bn3")(
            layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv3")(x)
        ),
        layers.BatchNormalization(name=f"{name}_bn1")(
            layers.Conv2D(filters, 1, strides=strides, padding="same", use_bias=False, name=f"{name}_conv1")(x)
        ),
    ]
    if strides == 1 and channels == filters:
        terms.append(layers.BatchNormalization(name=f"{name}_bn_identity")(x))
    return layers.ReLU(name=f"{name}_relu")(layers.Add(name=f"{name}_sum")(terms))


def repvgg(size=64, widths=(32, 64, 128, 256), depth=(1, 2, 4, 1)):
    inputs = keras.Input((size, size, 3))
    x = layers.Conv2D(widths[0], 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
    for stage, (width, blocks) in enumerate(zip(widths, depth)):
        for block in range(blocks):
            # with a stride, "same" pads a 3x3 and a 1x1 alike only on odd sizes (run() feeds odd ones)
            strides = 2 if block == 0 and stage > 0 else 1
            x = repvgg_block(x, width, strides, f"s{stage}b{block}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, layers.Dense(10, name="head")(x), name="repvgg")
    generator = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(generator.normal(0, 0.1, channels))
            layer.moving_variance.assign(generator.uniform(0.5, 1.5, channels))
            layer.gamma.assign(generator.uniform(0.5, 1.5, channels))
            layer.beta.assign(generator.normal(0, 0.1, channels))
    return model


def _count(model, kind):
    return sum(isinstance(layer, kind) for layer in model._flatten_layers(include_self=False))


def _d_fine_rows():
    try:
        from keras_hub.src.models.d_fine.d_fine_layers import DFineCSPRepLayer
    except ImportError:
        return []
    import bnseq

    block = DFineCSPRepLayer(
        activation_function="silu", batch_norm_eps=1e-5, filters=64, num_blocks=3, channel_axis=-1, name="csp"
    )
    inputs = keras.Input((32, 32, 64))
    model = keras.Model(inputs, block(inputs))
    merged = bnseq.reparameterize(model)
    folded = bnseq.fold(merged)
    rows = [[
        "D-FINE DFineCSPRepLayer (3 blocks)",
        f"{_count(model, layers.Conv2D)} / {_count(model, layers.BatchNormalization)}",
        f"{_count(merged, layers.Conv2D)} / {_count(merged, layers.BatchNormalization)}",
        f"{_count(folded, layers.Conv2D)} / {_count(folded, layers.BatchNormalization)}",
        f"{sum(d.merged for d in bnseq.reparameterize_report(model))} merged",
    ]]
    try:
        from tests.backbones import d_fine
    except ImportError:
        return rows
    backbone = d_fine()
    report = bnseq.reparameterize_report(backbone)
    rows.append([
        "D-FINE DFineBackbone (tests/backbones.py)",
        f"{_count(backbone, layers.Conv2D)} / {_count(backbone, layers.BatchNormalization)}",
        "unchanged",
        "",
        f"{sum(d.merged for d in report)} of {len(report)} sums merged (the hybrid encoder does not trace)",
    ])
    return rows


def run(quick=False):
    import bnseq

    size, rounds = (32, 3) if quick else (96, 15)
    model = repvgg(size=size + 1)  # odd sizes: see repvgg_block
    model.compile()
    merged = bnseq.reparameterize(model)
    merged.compile()
    folded = bnseq.fold(merged)
    folded.compile()
    batch = np.random.default_rng(1).normal(size=(32, size + 1, size + 1, 3)).astype("float32")
    expected = model.predict_on_batch(batch)
    differences = {
        name: float(np.max(np.abs(candidate.predict_on_batch(batch) - expected)) / np.max(np.abs(expected)))
        for name, candidate in (("merged", merged), ("folded", folded))
    }
    times = common.interleaved(
        {name: functools.partial(candidate.predict_on_batch, batch)
         for name, candidate in (("as trained", model), ("merged", merged), ("folded", folded))},
        rounds=rounds,
    )
    rows = [
        [name, f"{_count(candidate, layers.Conv2D)} / {_count(candidate, layers.BatchNormalization)}",
         common.spread(times[name]), f"{common.ratio(times[name], times['as trained']):.2f}",
         "" if name == "as trained" else f"{differences[name]:.1e}"]
        for name, candidate in (("as trained", model), ("merged", merged), ("folded", folded))
    ]
    markdown = (
        f"RepVGG-style network, input {size + 1}x{size + 1}, batch 32, `predict_on_batch`, {rounds} interleaved "
        "rounds.\n\n"
        + common.table(["model", "Conv2D / BN", "ms per batch", "ratio to as trained", "relative difference"], rows)
    )
    if not quick:
        d_fine = _d_fine_rows()
        if d_fine:
            markdown += "\n\n" + common.table(
                ["keras-hub model", "Conv2D / BN before", "after reparameterize", "then fold", "sums"], d_fine
            )
    return markdown, {"times": times, "differences": differences}
