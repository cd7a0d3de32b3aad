"""The `bnseq demo` job: one model written by hand in Keras and with bnseq."""

import itertools

import keras
from keras import layers

import bnseq

# The README's example: a channels_first convolution (where the right axis is
# easy to get wrong), a hidden Dense layer, and an output layer left alone.
INPUT_SHAPE = (3, 100, 100)


def build_by_hand():
    """The example as a careful user writes it in plain Keras."""
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            layers.Conv2D(32, (3, 3), data_format="channels_first", use_bias=False),
            layers.BatchNormalization(axis=1),
            layers.Flatten(),
            layers.Dense(100, use_bias=False),
            layers.BatchNormalization(axis=-1),
            layers.Activation("relu"),
            layers.Dense(10, activation="softmax"),
        ],
        name="by_hand",
    )


def build_with_bnseq():
    """The same model, written the short way."""
    model = bnseq.Sequential(batch_norm=True, name="bnseq")
    model.add(keras.Input(INPUT_SHAPE))
    model.add(layers.Conv2D(32, (3, 3), data_format="channels_first"))
    model.add(layers.Flatten())
    model.add(layers.Dense(100, activation="relu"))
    model.add(layers.Dense(10, activation="softmax"), batch_norm=False)
    return model


def side_by_side(left, right, gap=2):
    """Two blocks of text as columns."""
    left_lines, right_lines = left.splitlines(), right.splitlines()
    width = max(map(len, left_lines), default=0)
    return "\n".join(
        f"{a:<{width}}{' ' * gap}{b}".rstrip()
        for a, b in itertools.zip_longest(left_lines, right_lines, fillvalue="")
    )


def summary_text(model, line_length=62):
    lines = []
    model.summary(print_fn=lines.append, line_length=line_length)
    return "\n".join(lines)


def removed_biases(model):
    """(layer name, bias size) for each linear layer followed by its normalization."""
    return [
        (layer.name, int(layer.output.shape[after.axis]))
        for layer, after in zip(model.layers, model.layers[1:])
        if bnseq.rules.is_linear(layer)
        and isinstance(after, layers.BatchNormalization)
    ]


def run(print_fn=print):
    """Build both models, print their summaries and what the biases cost."""
    by_hand, with_bnseq = build_by_hand(), build_with_bnseq()
    print_fn(
        "Left: written by hand in plain Keras. Right: bnseq.Sequential"
        "(batch_norm=True) with one add() per layer.\n"
    )
    print_fn(side_by_side(summary_text(by_hand), summary_text(with_bnseq)))
    biases = removed_biases(with_bnseq)
    saved = sum(size for _, size in biases)
    same = by_hand.count_params() == with_bnseq.count_params()
    print_fn(
        f"\nParameters: by hand {by_hand.count_params():,}, bnseq "
        f"{with_bnseq.count_params():,} ({'identical' if same else 'DIFFERENT'})."
    )
    print_fn(
        f"Biases bnseq removed because BatchNormalization cancels them: "
        f"{saved:,} parameters ("
        + ", ".join(f"{name} {size}" for name, size in biases)
        + "), the same ones a model that keeps them would waste."
    )
    return 0 if same else 1
