"""The fold as NumPy functions of weights: plain arrays in, plain arrays out.

At inference a BatchNormalization is a fixed affine map per channel,
`y = s * (x - moving_mean) + beta` with `s = gamma / sqrt(moving_variance +
epsilon)`. After a linear layer `x = W * input + b` it folds into that layer:
`kernel' = kernel * s` (over output channels) and
`bias' = s * (b - moving_mean) + beta`, giving the same outputs with one layer
fewer. Before a linear layer it folds forward into it (`why_not_forward` says
where that is exact). `changing/folding.py` builds the layers.
"""

import keras
import numpy as np

from bnseq import kinds


def batch_norm_affine(moving_mean, moving_variance, epsilon, gamma=None, beta=None):
    """The per-channel `(scale, shift)` of a BatchNormalization at inference.

    `y = scale * x + shift`, computed in float64.

    Args:
        moving_mean: array. The moving mean, one value per channel.
        moving_variance: array. The moving variance.
        epsilon: float. The layer's `epsilon`.
        gamma: array, optional. `None` when the layer has `scale=False`.
        beta: array, optional. `None` when the layer has `center=False`.

    Returns:
        (scale, shift), two float64 arrays.

    Examples:
        >>> scale, shift = batch_norm_affine(
        ...     np.array([1.0]), np.array([4.0]), 0.0, gamma=np.array([2.0]))
        >>> scale, shift
        (array([1.]), array([-1.]))
    """
    mean = np.asarray(moving_mean, np.float64)
    scale = 1.0 / np.sqrt(np.asarray(moving_variance, np.float64) + epsilon)
    if gamma is not None:
        scale = scale * np.asarray(gamma, np.float64)
    shift = -scale * mean
    if beta is not None:
        shift = shift + np.asarray(beta, np.float64)
    return scale, shift


def scale_kernel(kernel, scale, layout):
    """Scale a kernel's output channels by `scale`, in float64.

    Args:
        kernel: array. The kernel in Keras's layout.
        scale: array. One factor per output channel.
        layout: str. Where the output channels are: `"last"` for Dense
            `(in, out)`, convolutions `(*k, in/groups, out)` and the pointwise
            kernel of a separable convolution; `"transpose"` for transposed
            convolutions `(*k, out, in)`; `"depthwise"` for depthwise
            convolutions `(*k, in, multiplier)`, whose output channel
            `c * multiplier + m` is entry `[..., c, m]`.

    Returns:
        float64 array of the kernel's shape.
    """
    kernel = np.asarray(kernel, np.float64)
    if layout == "last":
        return kernel * scale
    if layout == "transpose":
        return kernel * scale[:, None]
    if layout == "depthwise":
        return kernel * scale.reshape(kernel.shape[-2:])
    raise ValueError(f"Unknown kernel layout. Received: layout={layout!r}")


def _layout(layer):
    if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)):
        return "transpose"
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        return "depthwise"
    return "last"


def folded_weights(layer, batch_norm_layer):
    """The weights of `layer` with `batch_norm_layer` folded in.

    Args:
        layer: one of the linear layers, built, with the identity activation.
        batch_norm_layer: the built `BatchNormalization` right after it.

    Returns:
        list of arrays for `set_weights` on the same layer with
        `use_bias=True`: its kernels (only the last one, the pointwise kernel
        of a separable convolution, scaled) and the new bias, each in its
        variable's dtype.
    """
    return weights_with(layer, None, batch_norm_layer)


def why_not_forward(layer):
    """Why an affine map per input channel cannot fold exactly into `layer`'s kernel, or None.

    `layer(s * x + t) = W' x + b'` with `W' = diag(s) W` (over input channels)
    and `b' = b + t W` (summed over the kernel's positions) holds wherever
    every output sums the same kernel positions: for Dense, and for
    convolutions that do not pad (`padding="valid"`, or every kernel size 1).
    Under zero padding a border output would see `s * 0 + t` where it sees 0.
    """
    foldable = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
    transposed = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
    if not isinstance(layer, foldable) or isinstance(layer, transposed):
        return f"{kinds.describe(layer)} is not a Dense layer or a plain or depthwise convolution"
    if type(layer) not in foldable:
        return f"{kinds.describe(layer)} is a subclass of {kinds.keras_base(layer).__name__}"
    if len(layer.weights) != 1 + int(layer.use_bias):
        return f"{kinds.describe(layer)} has weights beyond kernel and bias (quantized or LoRA)"
    if getattr(layer, "groups", 1) != 1:
        return f"{kinds.describe(layer)} is a grouped convolution"
    if not isinstance(layer, keras.layers.Dense) and layer.padding != "valid":
        if any(size != 1 for size in layer.kernel_size):
            return (
                f"{kinds.describe(layer)} pads its input ({layer.padding!r}) with a kernel larger than 1, "
                "where the shift would not reach the padded border"
            )
    return None


def forward_folded_weights(layer, scale, shift, kernel=None, bias=None):
    """`layer`'s kernel and bias with the map `x -> scale * x + shift` of its input folded in.

    Args:
        layer: a layer `why_not_forward` accepts, built.
        scale: array. One value per input channel.
        shift: array. One value per input channel.
        kernel: array, optional. The kernel to fold into (default: the
            layer's own).
        bias: array, optional. The bias to fold into (default: the layer's
            own; no bias is zeros).

    Returns:
        (kernel, bias) as float64 arrays.
    """
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel) if kernel is None else kernel, np.float64)
    if bias is None:
        bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else 0.0
    bias = np.asarray(bias, np.float64)
    scale, shift = np.asarray(scale, np.float64), np.asarray(shift, np.float64)
    # Input channels are the kernel's second-last axis in every layout accepted here.
    new_kernel = kernel * scale[:, None]
    spatial = tuple(range(kernel.ndim - 2))
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        # (*k, in, multiplier): output channel c * multiplier + m sees only input channel c.
        added = (shift[:, None] * kernel.sum(axis=spatial)).reshape(-1)
    else:
        added = np.tensordot(shift, kernel.sum(axis=spatial), axes=([0], [0]))
    return new_kernel, bias + added


def weights_with(layer, before, after, before_channels=None):
    """`layer`'s weights with `before` folded forward into it and `after` folded back into it.

    `after` is a BatchNormalization or a list of them applied in turn.
    `before_channels`: for a Dense layer fed through a Flatten, the channel
    of `before` each input feature holds (`None`: feature i is channel i).
    """
    weights = layer.get_weights()
    kernels = [np.asarray(each, np.float64) for each in (weights[:-1] if layer.use_bias else weights)]
    bias = np.asarray(weights[-1], np.float64) if layer.use_bias else 0.0
    if before is not None:  # a single kernel (why_not_forward)
        scale, shift = affine_of(before)
        if before_channels is not None:
            scale, shift = scale[before_channels], shift[before_channels]
        kernel, bias = forward_folded_weights(layer, scale, shift, kernel=kernels[0], bias=bias)
        kernels = [kernel]
    if after is not None:
        scale, shift = composed_affine(after)
        kernels = [*kernels[:-1], scale_kernel(kernels[-1], scale, _layout(layer))]
        bias = scale * bias + shift
    bias_dtype = weights[-1].dtype if layer.use_bias else weights[0].dtype
    return [
        *(kernel.astype(original.dtype) for kernel, original in zip(kernels, weights)),
        np.asarray(bias).astype(bias_dtype),
    ]


class Part:
    """The part of a BatchNormalization's map that one input of a merge takes (`fold_through.through_merge`).

    `channels`: the slice of its channels this input holds (a
    Concatenate), or `None` for all (an Add); `shift`: whether this input
    takes the shift (an Add gives it to one input only).
    """

    def __init__(self, batch_norm, channels=None, shift=True):
        self.batch_norm, self.channels, self.shift = batch_norm, channels, shift

    def affine(self):
        scale, shift = affine_of(self.batch_norm)
        if self.channels is not None:
            scale, shift = scale[self.channels], shift[self.channels]
        return scale, shift if self.shift else np.zeros_like(shift)


def composed_affine(batch_norms):
    """The `(scale, shift)` of BatchNormalization layers (or `Part`s) applied one after the other (one, or a list)."""
    if not isinstance(batch_norms, (list, tuple)):
        batch_norms = [batch_norms]
    scale, shift = 1.0, 0.0
    for bn in batch_norms:
        step_scale, step_shift = bn.affine() if isinstance(bn, Part) else affine_of(bn)
        scale, shift = step_scale * scale, step_scale * shift + step_shift
    return scale, shift


def affine_of(bn):
    """`batch_norm_affine` of a built BatchNormalization layer: its `(scale, shift)` at inference."""
    return batch_norm_affine(
        keras.ops.convert_to_numpy(bn.moving_mean),
        keras.ops.convert_to_numpy(bn.moving_variance),
        bn.epsilon,
        gamma=keras.ops.convert_to_numpy(bn.gamma) if bn.scale else None,
        beta=keras.ops.convert_to_numpy(bn.beta) if bn.center else None,
    )
