"""Hypothesis strategies: random stacks of the eleven linear layer kinds.

A stack is drawn as plain data (`Spec`s), from which tests build fresh layers
as often as they need: once for bnseq, once for plain Keras, once written by
hand in the normalized form.
"""

import dataclasses

import keras
from hypothesis import strategies as st
from keras import layers

# Linear layer kinds by the number of spatial axes of their input.
KINDS = {
    1: [layers.Conv1D, layers.Conv1DTranspose, layers.DepthwiseConv1D, layers.SeparableConv1D],
    2: [layers.Conv2D, layers.Conv2DTranspose, layers.DepthwiseConv2D, layers.SeparableConv2D],
    3: [layers.Conv3D, layers.Conv3DTranspose],
}

# How an activation can be given: by name of a case, built fresh on demand.
ACTIVATIONS = {
    "none": lambda: None,
    "linear": lambda: "linear",
    "relu": lambda: "relu",
    "tanh": lambda: "tanh",
    "function": lambda: keras.activations.elu,
    "layer": lambda: layers.LeakyReLU(negative_slope=0.2),
}


@dataclasses.dataclass(frozen=True)
class Spec:
    kind: type
    units: int
    data_format: str
    activation: str
    use_bias: bool
    batch_norm: object  # the per-layer override: None, False, True or a dict

    def make(self, **overrides):
        """A fresh layer with this spec, with `overrides` on its arguments."""
        kwargs = {"use_bias": self.use_bias, "activation": ACTIVATIONS[self.activation]()}
        if self.kind is layers.Dense:
            kwargs["units"] = self.units
        else:
            kwargs.update(kernel_size=2, padding="same", data_format=self.data_format)
            if issubclass(self.kind, (layers.DepthwiseConv1D, layers.DepthwiseConv2D)):
                kwargs["depth_multiplier"] = self.units
            else:
                kwargs["filters"] = self.units
        kwargs.update(overrides)
        return self.kind(**kwargs)

    def normalized(self, model_batch_norm):
        """Whether bnseq should normalize this layer in such a model."""
        if self.batch_norm is None:
            return bool(model_batch_norm)
        return self.batch_norm is not False

    @property
    def channel_axis(self):
        return 1 if self.data_format == "channels_first" and self.kind is not layers.Dense else -1


@st.composite
def stacks(draw, max_layers=4):
    """(input shape without batch, [Spec, ...], model batch_norm setting)."""
    rank = draw(st.sampled_from([1, 2, 3]))
    kinds = KINDS[rank] + [layers.Dense]
    specs = draw(
        st.lists(
            st.builds(
                Spec,
                kind=st.sampled_from(kinds),
                units=st.integers(1, 3),
                data_format=st.sampled_from(["channels_last", "channels_first"]),
                activation=st.sampled_from(sorted(ACTIVATIONS)),
                use_bias=st.booleans(),
                batch_norm=st.sampled_from([None, None, False, True, {"momentum": 0.9}]),
            ),
            min_size=1,
            max_size=max_layers,
        )
    )
    shape = tuple(draw(st.integers(2, 3)) for _ in range(rank + 1))
    model_batch_norm = draw(st.sampled_from([True, False, {"epsilon": 1e-4}]))
    return shape, specs, model_batch_norm


def build_by_hand(shape, specs, model_batch_norm):
    """The normalized form written out in plain Keras, independently of bnseq."""
    model = keras.Sequential([keras.Input(shape)])
    for spec in specs:
        if not spec.normalized(model_batch_norm):
            model.add(spec.make())
            continue
        model.add(spec.make(use_bias=False, activation=None))
        options = {
            **(model_batch_norm if isinstance(model_batch_norm, dict) else {}),
            **(spec.batch_norm if isinstance(spec.batch_norm, dict) else {}),
        }
        model.add(layers.BatchNormalization(axis=spec.channel_axis, **options))
        activation = spec.make().activation
        if isinstance(activation, keras.Layer):
            model.add(activation)
        elif activation is not keras.activations.linear:
            model.add(layers.Activation(activation))
    return model
