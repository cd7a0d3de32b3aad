"""Memory: the parameters and bytes that the removed biases save.

Counted from the models themselves: every bias of a linear layer whose output
goes only to a BatchNormalization, which cancels it (what `bnseq.lint`
reports as BN001, and what bnseq.Sequential(batch_norm=True) never creates).
"""

import keras
import numpy as np
from keras import layers

import bnseq
from benchmarks import common


def cancelled_biases(model):
    """(parameters, bytes) of the biases a BatchNormalization right after cancels."""
    graph = bnseq.reading.graph.walk(model)
    parameters = size_in_bytes = 0
    for layer in graph.layers:
        producer = graph.sole_producer(layer)
        if (
            isinstance(layer, layers.BatchNormalization)
            and producer is not None
            and bnseq.kinds.is_linear(producer)
            and producer.use_bias
        ):
            count = int(np.prod(producer.bias.shape))
            parameters += count
            size_in_bytes += count * np.dtype(keras.backend.standardize_dtype(producer.bias.dtype)).itemsize
    return parameters, size_in_bytes


def readme_example_with_biases():
    """The README's example as users write it without bnseq: biases kept."""
    return keras.Sequential(
        [
            keras.Input((3, 100, 100)),
            layers.Conv2D(32, (3, 3), data_format="channels_first"),
            layers.BatchNormalization(axis=1),
            layers.Flatten(),
            layers.Dense(100),
            layers.BatchNormalization(),
            layers.Activation("relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )


def run(quick=False):
    keras.backend.clear_session()
    shape = (64, 64, 3) if quick else (224, 224, 3)
    models = {
        "README example, biases kept": readme_example_with_biases(),
        "ResNet50 (keras.applications, weights=None)": keras.applications.ResNet50(
            weights=None, input_shape=shape
        ),
    }
    rows, results = [], {}
    for name, model in models.items():
        parameters, size_in_bytes = cancelled_biases(model)
        results[name] = (parameters, size_in_bytes)
        rows.append(
            [name, f"{model.count_params():,}", f"{parameters:,}", f"{size_in_bytes:,}",
             f"{100 * parameters / model.count_params():.3f}%"]
        )
    header = ["model", "parameters", "bias parameters saved", "bytes saved", "share of parameters"]
    return common.table(header, rows), results
