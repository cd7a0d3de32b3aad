"""The layers of a quantize-aware model: a linear layer trained as int8 will run it, and a range quantizer.

An int8 runtime (LiteRT) runs a linear layer with its BatchNormalization
folded into it (`kernel * gamma / sqrt(moving_variance + epsilon)`, and a new
bias), its weights rounded to int8 (per output channel for convolutions), and
every tensor between layers rounded to one of 256 levels of a range. Training
for that rounds the same way in float ("fake quantization", Jacob et al. 2018,
"Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference"), so the weights learn to live with it.

`QuantizedLinear` is one linear layer of the model, with its BatchNormalization
and activation when it has them, trained as one unit. In training mode, while
the statistics still move, it folds with the moving standard deviation and
corrects the output to the batch's (the correction of Jacob et al. section
3.2, as TensorFlow's own `fold_batch_norms` rewrite did):
`y = conv(x, q(W * gamma / sigma)) * sigma / sigma_B + beta - gamma * mean_B / sigma_B`,
which equals the BatchNormalization's training output where `q` is the
identity, while the weights it rounds are the ones that will be exported.
After `freeze_statistics_after` training steps it uses the moving statistics,
`y = conv(x, q(W * gamma / sigma)) + beta + gamma * (b - mean) / sigma`: from
then on training computes exactly what the exported model computes.

`ActivationQuantizer` rounds a tensor to 256 levels of `[minimum, maximum]`
(asymmetric, as LiteRT's int8 activations are). Its range is a moving minimum
and maximum of the batches seen in training (momentum 0.99, the first batch
taken whole), not a learned one: the moving range is what LiteRT's own
converter and the TensorFlow Model Optimization toolkit used, needs no
learning rate, and cannot collapse early in training. Softmax, sigmoid and tanh
outputs take the fixed ranges LiteRT's int8 kernels require.

The rounding is `keras.quantizers.fake_quant_with_min_max_vars`, which on
TensorFlow is TensorFlow's FakeQuant op: the op the LiteRT converter reads the
ranges from, so `bnseq.export` needs no calibration data.
"""

import keras
from keras import layers as keras_layers
from keras import ops

from bnseq import kinds
from bnseq.deciding.quantize_plan import FIXED_RANGES
from bnseq.deciding.quantize_plan import FUSED_ACTIVATIONS
from bnseq.deciding.quantize_plan import QUANTIZABLE
from bnseq.deciding.quantize_plan import activation_name

# int8 as LiteRT computes it: weights symmetric in [-127, 127] ("narrow range", zero point 0),
# activations asymmetric over 256 levels.
BITS = 8
# Before the first training batch a range is this (the default of the TF Model Optimization toolkit).
INITIAL_RANGE = (-6.0, 6.0)
TINY = 1e-8  # the smallest range: a channel of zeros still has a scale


def fake_quantize_weights(kernel, axis=None):
    """`kernel` rounded to int8 symmetric levels, per channel along `axis` (per tensor when `None`)."""
    if axis is None:
        limit = ops.maximum(ops.max(ops.abs(kernel)), TINY)
        return keras.quantizers.fake_quant_with_min_max_vars(kernel, -limit, limit, num_bits=BITS, narrow_range=True)
    axis = axis % len(kernel.shape)
    limit = ops.maximum(ops.max(ops.abs(kernel), axis=[i for i in range(len(kernel.shape)) if i != axis]), TINY)
    return keras.quantizers.fake_quant_with_min_max_vars(
        kernel, -limit, limit, num_bits=BITS, narrow_range=True, axis=axis
    )


def check_freeze_statistics_after(value):
    """Raise unless `value` is a number of training steps (an int >= 0) or `None`."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(
            "freeze_statistics_after must be a number of training steps (an int >= 0) or None. "
            f"Received: freeze_statistics_after={value!r}"
        )


def _across_replicas(low, high):
    """The range of the whole batch where a tf.distribute strategy gives each replica a part of it.

    On one device, and on JAX (whose distributed batch is one sharded array), the range is already the
    batch's. Under a TensorFlow strategy each replica sees its share: gathered, the ranges combine into
    the one a single device would learn, whatever the number of replicas.
    """
    if keras.backend.backend() != "tensorflow":
        return low, high
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return low, high
    gathered = context.all_gather(ops.stack([-low, high])[None], axis=0)
    widest = ops.max(gathered, axis=0)
    return -widest[0], widest[1]


@keras.saving.register_keras_serializable(package="bnseq", name="ActivationQuantizer")
class ActivationQuantizer(keras.layers.Layer):
    """Rounds a tensor to 256 levels of a range, as an int8 runtime stores it between layers.

    In training the range follows the batches: a moving minimum and maximum
    (the first batch taken whole, then `momentum`), always including 0 so
    that zero is exact. In inference it is fixed. The rounding passes
    gradients straight through inside the range (and stops them outside).

    Args:
        momentum: float. For the moving range, as `BatchNormalization` takes it.
        fixed_range: (float, float), optional. A range that never moves (the
            one LiteRT requires after softmax, sigmoid and tanh).
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`).

    Examples:
        >>> quantizer = bnseq.ActivationQuantizer(fixed_range=(0.0, 255 / 256))
        >>> x = np.array([[0.0, 0.1, 0.5, 2.0]], "float32")
        >>> np.round(keras.ops.convert_to_numpy(quantizer(x)) * 256).astype(int).tolist()
        [[0, 26, 128, 255]]
    """

    bnseq_reads_as_leaf = True  # read whole, never traced (kinds.reads_as_leaf)

    def __init__(self, momentum=0.99, fixed_range=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1). Received: momentum={momentum!r}")
        if fixed_range is not None:
            low, high = (float(each) for each in fixed_range)
            if not low <= 0.0 <= high or low == high:
                raise ValueError(
                    f"fixed_range must hold 0 and not be empty. Received: fixed_range={fixed_range!r}"
                )
            fixed_range = (low, high)
        self.momentum = float(momentum)
        self.fixed_range = fixed_range
        self.supports_masking = True

    def build(self, input_shape):
        low, high = self.fixed_range or INITIAL_RANGE
        self.minimum = self.add_weight(
            name="minimum", shape=(), initializer=keras.initializers.Constant(low), trainable=False, autocast=False
        )
        self.maximum = self.add_weight(
            name="maximum", shape=(), initializer=keras.initializers.Constant(high), trainable=False, autocast=False
        )
        # Training batches seen: the first one sets the range, and an export refuses a range never trained.
        self.seen = self.add_weight(name="seen", shape=(), initializer="zeros", trainable=False, autocast=False)

    def call(self, inputs, training=None):
        low, high = self.minimum, self.maximum
        if training and self.fixed_range is None:
            values = ops.cast(inputs, "float32")
            batch_low, batch_high = _across_replicas(
                ops.minimum(ops.min(values), 0.0), ops.maximum(ops.max(values), 0.0)
            )
            first = ops.equal(self.seen, 0.0)
            low = ops.where(first, batch_low, low * self.momentum + batch_low * (1.0 - self.momentum))
            high = ops.where(first, batch_high, high * self.momentum + batch_high * (1.0 - self.momentum))
            self.minimum.assign(low)
            self.maximum.assign(high)
        if training:
            self.seen.assign(self.seen + 1.0)
        high = ops.maximum(high, low + TINY)
        return keras.quantizers.fake_quant_with_min_max_vars(inputs, low, high, num_bits=BITS)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "fixed_range": self.fixed_range}


# How LiteRT rounds the weights of each kind (quantize_plan.QUANTIZABLE): per output channel where
# the converter keeps the channel axis; per tensor for Dense and Conv2DTranspose, whose kernels the
# converter transposes, and it cannot move a per-channel axis through a transpose ("'tfl.transpose'
# op has mismatched quantized axes", TensorFlow 2.21). Conv1D runs as a 2-D convolution of height 1
# for the same reason (its ExpandDims moves the axis).


@keras.saving.register_keras_serializable(package="bnseq", name="QuantizedLinear")
class QuantizedLinear(keras.layers.Layer):
    """A linear layer, its BatchNormalization folded in and its activation, trained for int8.

    `bnseq.quantize_aware` builds these from a model's layers; the
    arithmetic is described in this module's docstring. The linear layer,
    the BatchNormalization and the activation are kept as sublayers, so
    their variables (and the statistics) are the original layers' and
    train as they would; the weights are rounded as LiteRT rounds them
    (per output channel for convolutions, per tensor for Dense and
    Conv2DTranspose) and the output is rounded by an `ActivationQuantizer`
    (after the activation; before it as well where LiteRT runs the
    activation as an operation of its own).

    Args:
        layer: Layer. A built or unbuilt `Dense`, `Conv1D`, `Conv2D`,
            `DepthwiseConv2D`, `SeparableConv2D` or `Conv2DTranspose` with
            the identity activation (or its config, as a saved model gives it).
        batch_norm: `keras.layers.BatchNormalization`, optional. The one
            right after it, on its channel axis.
        activation: Layer, optional. What follows (an `Activation`, `ReLU`,
            `LeakyReLU`, `ELU` or `Softmax` layer).
        freeze_statistics_after: int, optional. Training steps after which
            the BatchNormalization's moving statistics stop moving and the
            unit computes with them (`None`: never).
        momentum: float. Of the output ranges (`ActivationQuantizer`).
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`).
    """

    bnseq_reads_as_leaf = True  # read whole, never traced (kinds.reads_as_leaf)

    def __init__(self, layer, batch_norm=None, activation=None, freeze_statistics_after=None, momentum=0.99,
                 **kwargs):
        super().__init__(**kwargs)
        layer, batch_norm, activation = (
            keras.saving.deserialize_keras_object(each) if isinstance(each, dict) else each
            for each in (layer, batch_norm, activation)
        )
        if type(layer) not in QUANTIZABLE:
            names = ", ".join(kind.__name__ for kind in QUANTIZABLE)
            raise TypeError(f"QuantizedLinear holds one of {names}. Received: layer={layer!r}")
        if not kinds.is_identity(layer.activation):
            raise ValueError(
                f"{kinds.describe(layer)} applies its own activation; pass it as activation= instead "
                f"(a layer), so that the BatchNormalization comes before it. Received: layer={layer!r}"
            )
        if batch_norm is not None and not isinstance(batch_norm, keras_layers.BatchNormalization):
            raise TypeError(f"batch_norm must be a BatchNormalization layer. Received: batch_norm={batch_norm!r}")
        check_freeze_statistics_after(freeze_statistics_after)
        if activation is not None and not isinstance(activation, keras.Layer):
            activation = keras_layers.Activation(activation, name=f"{self.name}_activation", dtype=self.dtype_policy)
        self.layer, self.batch_norm, self.activation = layer, batch_norm, activation
        self.freeze_statistics_after = freeze_statistics_after
        self.momentum = float(momentum)
        name = activation_name(activation)
        self.input_range = None
        if name not in FUSED_ACTIVATIONS:  # LiteRT runs it as an op of its own, on an int8 input
            self.input_range = ActivationQuantizer(
                momentum, name=f"{self.name}_before_activation", dtype=self.dtype_policy
            )
        self.output_range = ActivationQuantizer(
            momentum, FIXED_RANGES.get(name), name=f"{self.name}_output", dtype=self.dtype_policy
        )
        self.between = None  # a separable convolution's depthwise output is a tensor of its own in LiteRT
        if isinstance(layer, keras_layers.SeparableConv2D):
            self.between = ActivationQuantizer(momentum, name=f"{self.name}_depthwise_output", dtype=self.dtype_policy)

    def build(self, input_shape):
        output_shape = self.layer.compute_output_shape(input_shape)
        # A loaded model's sublayers come built from their configs.
        for sublayer, shape in ((self.layer, input_shape), (self.batch_norm, output_shape),
                                (self.activation, output_shape), (self.input_range, output_shape),
                                (self.output_range, output_shape), (self.between, output_shape)):
            if sublayer is not None and not sublayer.built:
                sublayer.build(shape)
        self.steps = self.add_weight(name="steps", shape=(), initializer="zeros", trainable=False, autocast=False)

    # The linear op ------------------------------------------------------------------------------

    def _channel_axis(self, rank):
        return 1 if getattr(self.layer, "data_format", None) == "channels_first" else rank - 1

    def _per_channel(self, vector, rank):
        """`vector` (one value per output channel) shaped to broadcast over the output."""
        shape = [1] * rank
        shape[self._channel_axis(rank)] = -1
        return ops.reshape(vector, shape)

    def _kernels(self):
        layer = self.layer
        if isinstance(layer, keras_layers.SeparableConv2D):
            return [layer.depthwise_kernel, layer.pointwise_kernel]
        return [layer.kernel]

    def _scaled(self, kernels, scale):
        """The kernels with each output channel scaled (the last kernel carries the output channels)."""
        layer, kernel = self.layer, kernels[-1]
        if isinstance(layer, keras_layers.Conv2DTranspose):  # (*k, out, in)
            scaled = kernel * ops.reshape(scale, (-1, 1))
        elif isinstance(layer, keras_layers.DepthwiseConv2D):  # (*k, in, multiplier)
            scaled = kernel * ops.reshape(scale, tuple(kernel.shape[-2:]))
        else:  # (..., out)
            scaled = kernel * scale
        return [*kernels[:-1], scaled]

    def _rounded(self, kernels):
        """The kernels rounded as LiteRT stores them."""
        layer = self.layer
        if isinstance(layer, (keras_layers.Dense, keras_layers.Conv2DTranspose)):
            return [fake_quantize_weights(kernels[0])]
        if isinstance(layer, keras_layers.Conv1D):  # as the 2-D kernel LiteRT runs: (1, k, in, out)
            return [fake_quantize_weights(ops.expand_dims(kernels[0], 0), axis=-1)]
        rounded = []
        for kernel in kernels:
            if kernel is kernels[0] and isinstance(layer, (keras_layers.DepthwiseConv2D, keras_layers.SeparableConv2D)):
                # (*k, in, multiplier): output channel c * multiplier + m, per channel as (*k, 1, in * multiplier)
                flat = ops.reshape(kernel, (*kernel.shape[:-2], 1, -1))
                rounded.append(ops.reshape(fake_quantize_weights(flat, axis=-1), kernel.shape))
            else:
                rounded.append(fake_quantize_weights(kernel, axis=-1))
        return rounded

    def _linear(self, inputs, kernels, quantized):
        """The layer's linear op (no bias) with `kernels`; `quantized`: its inner tensor rounded too."""
        layer = self.layer
        if isinstance(layer, keras_layers.Dense):
            return ops.matmul(inputs, kernels[0])
        if isinstance(layer, keras_layers.Conv2DTranspose):
            return ops.conv_transpose(
                inputs, kernels[0], strides=list(layer.strides), padding=layer.padding,
                output_padding=layer.output_padding, dilation_rate=layer.dilation_rate, data_format=layer.data_format,
            )
        if isinstance(layer, keras_layers.DepthwiseConv2D):
            return ops.depthwise_conv(
                inputs, kernels[0], strides=layer.strides, padding=layer.padding,
                dilation_rate=layer.dilation_rate, data_format=layer.data_format,
            )
        if isinstance(layer, keras_layers.SeparableConv2D):
            inner = ops.depthwise_conv(
                inputs, kernels[0], strides=layer.strides, padding=layer.padding,
                dilation_rate=layer.dilation_rate, data_format=layer.data_format,
            )
            if quantized:
                inner = self.between(inner)
            return ops.conv(inner, kernels[1], strides=1, padding="valid", data_format=layer.data_format)
        if isinstance(layer, keras_layers.Conv1D):
            return self._conv1d(inputs, kernels[0])
        return layer.convolution_op(inputs, kernels[0])

    def _conv1d(self, inputs, kernel):
        """Conv1D as a 2-D convolution of height 1 (its kernel given 4-D or 3-D), as LiteRT runs it."""
        layer = self.layer
        if len(kernel.shape) == 3:
            kernel = ops.expand_dims(kernel, 0)
        padding = layer.padding
        height = 2 if layer.data_format == "channels_first" else 1
        if padding == "causal":  # what Keras's Conv1D does: pad the start of the steps, then "valid"
            steps = [[0, 0], [0, 0], [0, 0]]
            steps[height][0] = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            inputs = ops.pad(inputs, steps)
            padding = "valid"
        outputs = ops.conv(
            ops.expand_dims(inputs, height), kernel, strides=(1, layer.strides[0]), padding=padding,
            dilation_rate=(1, layer.dilation_rate[0]), data_format=layer.data_format,
        )
        return ops.squeeze(outputs, height)

    # The unit ---------------------------------------------------------------------------------

    def call(self, inputs, training=None):
        layer, batch_norm = self.layer, self.batch_norm
        kernels = self._kernels()
        bias = layer.bias if layer.use_bias else None
        if batch_norm is None:
            outputs = self._linear(inputs, self._rounded(kernels), quantized=True)
            if bias is not None:
                outputs = outputs + self._per_channel(bias, len(outputs.shape))
        else:
            outputs = self._normalized(inputs, kernels, bias, training)
        if self.activation is not None:
            if self.input_range is not None:
                outputs = self.input_range(outputs, training=training)
            outputs = self.activation(outputs)
        return self.output_range(outputs, training=training)

    def _normalized(self, inputs, kernels, bias, training):
        """Linear op and BatchNormalization as one: the folded kernel rounded, batch or moving statistics."""
        batch_norm = self.batch_norm
        variance = ops.cast(batch_norm.moving_variance, "float32")
        sigma = ops.sqrt(variance + batch_norm.epsilon)
        gamma = ops.cast(batch_norm.gamma, "float32") if batch_norm.scale else ops.ones_like(sigma)
        beta = ops.cast(batch_norm.beta, "float32") if batch_norm.center else ops.zeros_like(sigma)
        mean = ops.cast(batch_norm.moving_mean, "float32")
        shift = ops.zeros_like(sigma) if bias is None else ops.cast(bias, "float32")
        scale = gamma / sigma
        outputs = self._linear(inputs, self._rounded(self._scaled(kernels, scale)), quantized=True)
        rank = len(outputs.shape)
        moving_bias = beta + scale * (shift - mean)
        # Keras's BatchNormalization computes with its moving statistics when it is not trainable; frozen
        # from the first step, training computes what inference computes (no batch statistics to take).
        if not (training and batch_norm.trainable) or self.freeze_statistics_after == 0:
            if training:
                self.steps.assign(self.steps + 1.0)
            return outputs + self._per_channel(moving_bias, rank)
        # What the BatchNormalization would normalize (the bias aside: the batch mean takes it away).
        plain = ops.cast(self._linear(inputs, kernels, quantized=False), "float32")
        axes = [axis for axis in range(rank) if axis != self._channel_axis(rank)]
        # A synchronized BatchNormalization (TensorFlow only) takes the statistics of the global batch
        # across the replicas of a tf.distribute strategy; its unit does the same.
        batch_mean, batch_variance = ops.moments(
            plain, axes=axes, synchronized=bool(getattr(batch_norm, "synchronized", False))
        )
        batch_sigma = ops.sqrt(batch_variance + batch_norm.epsilon)
        frozen = self._frozen()
        momentum = batch_norm.momentum
        batch_norm.moving_mean.assign(
            ops.where(frozen, mean, mean * momentum + (batch_mean + shift) * (1.0 - momentum))
        )
        batch_norm.moving_variance.assign(
            ops.where(frozen, variance, variance * momentum + batch_variance * (1.0 - momentum))
        )
        self.steps.assign(self.steps + 1.0)
        correction = ops.where(frozen, ops.ones_like(sigma), sigma / batch_sigma)
        batch_bias = ops.where(frozen, moving_bias, beta - gamma * batch_mean / batch_sigma)
        corrected = ops.cast(outputs, "float32") * self._per_channel(correction, rank)
        return ops.cast(corrected + self._per_channel(batch_bias, rank), outputs.dtype)

    def _frozen(self):
        if self.freeze_statistics_after is None:
            return ops.convert_to_tensor(False)
        return ops.greater_equal(self.steps, float(self.freeze_statistics_after))

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "layer": serialize(self.layer),
            "batch_norm": None if self.batch_norm is None else serialize(self.batch_norm),
            "activation": None if self.activation is None else serialize(self.activation),
            "freeze_statistics_after": self.freeze_statistics_after,
            "momentum": self.momentum,
        }
