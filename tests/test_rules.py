"""`bnseq.deciding.rules`: the `batch_norm` option check and the placement rules BN001-BN004."""

import keras
import numpy as np
import pytest
from keras import layers

from bnseq.deciding import rules


def test_batch_norm_options_in_canonical_form():
    assert rules.check_batch_norm(True) == {} and rules.check_batch_norm(np.bool_(False)) is False
    assert rules.check_batch_norm({"momentum": 0.9, "epsilon": 1e-3}) == {"momentum": 0.9, "epsilon": 1e-3}
    assert "axis" not in rules.BATCH_NORM_OPTIONS and "momentum" in rules.BATCH_NORM_OPTIONS


@pytest.mark.parametrize(
    "setting, error, message",
    [
        ("yes", TypeError, r"must be True, False or a dict .* Received: batch_norm='yes' \(of type str\)"),
        ({"axis": 1}, ValueError, r"cannot set `axis`: "),
        ({"momentun": 0.9}, ValueError, r"unknown BatchNormalization argument `momentun`\. Did you mean `momentum`\?"),
    ],
)
def test_batch_norm_options_refused(setting, error, message):
    with pytest.raises(error, match=message):
        rules.check_batch_norm(setting, owner="Dense 'd'")


def codes(producer, bn, shared=False):
    return [code for code, _ in rules.placement_problems(producer, bn, shared=shared)]


def test_each_placement_rule():
    bn = layers.BatchNormalization()
    assert codes(layers.Dense(3), bn) == ["BN001"]  # a bias the normalization subtracts again
    assert codes(layers.Dense(3), bn, shared=True) == []  # its output goes elsewhere too: not wasted
    assert codes(layers.Dense(3, use_bias=False, activation="relu"), bn) == ["BN002"]
    assert codes(layers.Dense(3, activation="relu"), bn) == ["BN001", "BN002"]
    assert codes(layers.Conv2D(3, 1, use_bias=False, data_format="channels_first"), bn) == ["BN003"]
    assert codes(layers.Conv2D(3, 1, use_bias=False, data_format="channels_first"), layers.BatchNormalization(1)) == []
    assert codes(layers.BatchNormalization(), bn) == ["BN004"]
    assert codes(layers.ReLU(), bn) == ["BN002"]
    assert codes(layers.Dense(3, use_bias=False), bn) == []


def test_bn001_counts_the_wasted_parameters():
    dense = layers.Dense(5)
    dense.build((None, 4))
    ((code, message),) = rules.placement_problems(dense, layers.BatchNormalization(name="bn"))
    assert code == "BN001" and "subtracts again (5 parameters wasted)" in message
    assert keras.ops.convert_to_numpy(dense.bias).shape == (5,)
