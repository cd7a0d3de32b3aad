"""bnseq.data: the batches of what `predict` takes, and a batch as a model's input tensors."""

import re

import keras
import numpy as np
import pytest
from keras import layers

from bnseq.statistics import data


def test_array_batches_with_a_ragged_last_one_and_steps():
    x = np.arange(10.0).reshape(10, 1)
    assert [len(batch) for batch in data.batches_of(x, 4, None)] == [4, 4, 2]
    assert [len(batch) for batch in data.batches_of(x, 4, 2)] == [4, 4]
    pair = data.batches_of([x, x * 2], 6, None)
    assert len(pair) == 2 and np.array_equal(pair[1][1], x[6:] * 2)


def test_x_of_each_batch_form():
    x = np.ones((2, 3))
    for batch in [x, (x,), (x, "y"), (x, "y", "w")]:
        (got,) = data.batches_of(iter([batch]), None, None)  # an iterable of batches
        assert got is x


def two_input_model():
    left, right = keras.Input((3,), name="left"), keras.Input((3, 1), name="right", dtype="float16")
    return keras.Model([left, right], layers.Add()([left, layers.Flatten()(right)]))


def test_model_inputs_by_name_with_dtype_and_a_missing_axis():
    model = two_input_model()
    left, right = data.model_inputs(model, {"right": np.ones((2, 3)), "left": np.zeros((2, 3))})
    assert keras.backend.standardize_dtype(right.dtype) == "float16"
    assert tuple(right.shape) == (2, 3, 1)  # the trailing axis of size 1, added as Keras does
    assert keras.ops.convert_to_numpy(left).sum() == 0


def test_model_inputs_errors_name_the_model_and_what_came():
    model = two_input_model()
    with pytest.raises(ValueError, match=re.escape(f"of Functional '{model.name}'. Received: keys=['left']")):
        data.model_inputs(model, {"left": np.zeros((2, 3))})
    with pytest.raises(ValueError, match=re.escape("takes 2 input(s), but a batch of the data holds 3")):
        data.model_inputs(model, [np.zeros((2, 3))] * 3)
