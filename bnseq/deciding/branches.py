"""What `bnseq.reparameterize` will merge: parallel affine branches summed into one convolution.

RepVGG, MobileOne and keras-hub's D-FINE train blocks that sum several
branches of one input: a k x k convolution with its BatchNormalization, a
1 x 1 one with its own, a BatchNormalization alone, the input itself. At
inference each branch is an affine map of the input, and so is their sum:
one convolution with a bias (`merged_weights`). Here each sum of a model is
read into its branches and either merged or kept with the reason
(`Reparameterization`, `bnseq.reparameterize_report`); `changing/
reparameterizing.py` builds the model. Plain values and read models in,
plain values out.

A branch is read from the sum back to its source tensor:
`[ZeroPadding] -> convolution -> [BatchNormalization]`, a BatchNormalization
alone, or nothing (the source itself). Branches merge when they read the
same tensor, every layer of a branch is used once and by that branch only,
the convolutions agree in kind, stride, groups and data format, and their
windows are centred on the same input position (each padding minus half its
kernel is the same), so that smaller kernels pad with zeros to the largest.
"""

import dataclasses
import math

import keras
import numpy as np

from bnseq import kinds
from bnseq.deciding import fold_math
from bnseq.deciding import guards
from bnseq.reading import files
from bnseq.reading import graph as graph_module
from bnseq.reading import partial

_CONVOLUTIONS = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
)
_PADDINGS = (keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)


@dataclasses.dataclass(frozen=True)
class Reparameterization:
    """What `reparameterize` does with one sum of branches.

    Attributes:
        sum: str. The name of the `Add` layer or `keras.ops.add` call.
        branches: tuple of str. Each branch as read, e.g. `"conv3 + bn3"`,
            `"bn_identity"` (a BatchNormalization alone), `"identity"` (the
            input itself).
        merged: bool. Whether the branches become one convolution.
        into: str or None. The name of that convolution.
        reason: str. Why the branches stay, when they do; empty otherwise.
    """

    sum: str
    branches: tuple
    merged: bool
    into: object = None
    reason: str = ""

    def __str__(self):
        listed = ", ".join(self.branches)
        if self.merged:
            return f"{self.sum}: {len(self.branches)} branches ({listed}) merged into {self.into}"
        return f"{self.sum}: kept ({listed}), {self.reason}"


@dataclasses.dataclass(frozen=True)
class Branch:
    """One term of a sum, read back to its source.

    `padding`, `conv` and `batch_norm` are the branch's layers in call order,
    each `None` where the branch has none (all three for the identity).
    `source` is the `graph.Ref` the branch reads.
    """

    source: object
    padding: object = None
    conv: object = None
    batch_norm: object = None
    identities: tuple = ()  # `Identity` layers (or linear `Activation`s) between them, dropped with them

    @property
    def layers(self):
        return [layer for layer in (self.padding, self.conv, self.batch_norm) if layer is not None]

    def __str__(self):
        return " + ".join(layer.name for layer in self.layers) or "identity"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sum to merge: the call to replace, the calls to drop, and the merged layer's geometry."""

    decision: Reparameterization
    call: object
    branches: tuple
    dropped: tuple  # every branch layer and every inner sum
    kernel_size: tuple = ()
    pads: tuple = ()  # ((before, after), ...) per spatial axis of the merged convolution


def reparameterize_report(model, *, safe_mode=True):
    """What `reparameterize(model)` would merge, one line per sum of branches.

    A sum is listed when at least two of its terms read one tensor and one
    of them is a convolution (a residual `Add` of two unrelated tensors is
    not a candidate and is not listed).

    Args:
        model: `keras.Model`, or the path of a `.keras` file.
        safe_mode: bool. Keras's `safe_mode` for loading a file.

    Returns:
        list of `Reparameterization`.

    Examples:
        >>> inputs = keras.Input((8, 8, 4))
        >>> a = keras.layers.BatchNormalization(name="bn3")(
        ...     keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv3")(inputs))
        >>> b = keras.layers.BatchNormalization(name="bn1")(
        ...     keras.layers.Conv2D(4, 1, use_bias=False, name="conv1")(inputs))
        >>> c = keras.layers.BatchNormalization(name="bn_id")(inputs)
        >>> model = keras.Model(inputs, keras.layers.Add(name="sum")([a, b, c]))
        >>> for line in bnseq.reparameterize_report(model):
        ...     print(line)
        sum: 3 branches (conv3 + bn3, conv1 + bn1, bn_id) merged into conv3
    """
    model = files.as_model(model, safe_mode=safe_mode)
    return [plan.decision for plan in decide(graph_module.walk(model))]


def decide(graph):
    """A `Plan` for each candidate sum of `graph` (see `reparameterize_report`), in call order."""
    flat = graph.flat
    producer = {}
    readers = {}
    for call in flat.calls:
        for ref in call.outputs:
            producer[ref] = call
        for ref in call.inputs:
            readers.setdefault(ref, []).append(call)
    outputs = set(flat.outputs)
    calls = {}
    for call in flat.calls:
        calls[id(call.operation)] = calls.get(id(call.operation), 0) + 1

    def only_reader(ref, call):
        """Whether `call` alone reads `ref`, `ref` is no model output, and its producer is called once."""
        made_by = producer.get(ref)
        return (
            readers.get(ref, []) == [call]
            and ref not in outputs
            and made_by is not None
            and calls[id(made_by.operation)] == 1
        )

    inside = [plan for layer in graph.layers if graph.hidden_batch_norms(layer) for plan in _inside(graph, layer)]
    plans, inner = [], set()
    candidates = [call for call in flat.calls if _is_sum(call)]
    for call in reversed(candidates):  # outermost first, so that nested sums join it
        if id(call) in inner:
            continue
        terms, sums = _terms(call, producer, only_reader)
        inner.update(id(each) for each in sums)
        branches = [_branch(ref, call_of_term, producer, only_reader) for ref, call_of_term in terms]
        sources = {}
        for branch in branches:
            sources.setdefault(branch.source, []).append(branch)
        if not any(len(group) > 1 and any(b.conv is not None for b in group) for group in sources.values()):
            continue
        plans.append(_plan(call, branches, sums, graph))
    return inside + plans[::-1]


def _inside(graph, layer):
    """The sums inside an opaque leaf that its readable sublayers show: each kept, saying what would merge."""
    where = f"it is inside {kinds.describe(layer)}, and {graph.why_opaque(layer)}"
    found = []
    for part in partial.parts_of(layer)[0]:
        for plan in decide(part.graph):
            decision = plan.decision
            there = f"it is kept there too: {decision.reason}"
            if decision.merged:
                there = f"it would merge into {decision.into}"
            seen = f"read through {kinds.describe(part.layer)}, {there}"
            reason = f"{where}; {seen}, but reparameterize cannot rebuild {kinds.describe(layer)} around it"
            found.append(Plan(Reparameterization(decision.sum, decision.branches, False, reason=reason), None, (), ()))
    return found


def _is_sum(call):
    operation = call.operation
    if isinstance(operation, keras.layers.Add):
        return kinds.is_keras_class(type(operation)) and not call.kwargs
    # keras.ops.add, written as `a + b` in a traced call() or in a functional model
    return type(operation).__name__ == "Add" and not isinstance(operation, keras.layers.Layer) and len(call.args) == 2


def _terms(call, producer, only_reader):
    """The `(Ref, reading call)` terms of the sum `call`, with nested sums used only by it opened up."""
    terms, sums = [], [call]
    for ref in call.inputs:
        made_by = producer.get(ref)
        if made_by is not None and _is_sum(made_by) and only_reader(ref, call):
            nested, nested_sums = _terms(made_by, producer, only_reader)
            terms += nested
            sums += nested_sums
        else:
            terms.append((ref, call))
    return terms, sums


def _branch(ref, reader, producer, only_reader):
    """The branch ending in `ref` (read by `reader`): its layers, and the tensor it starts from."""
    found, identities, start = {}, [], ref

    def past_identities(ref, reader):
        made_by = producer.get(ref)
        while made_by is not None and _is_identity(made_by) and only_reader(ref, reader):
            identities.append(made_by.operation)
            reader, ref = made_by, made_by.inputs[0]
            made_by = producer.get(ref)
        return ref, reader, made_by

    ref, reader, made_by = past_identities(ref, reader)
    if made_by is not None and _plain(made_by, keras.layers.BatchNormalization) and only_reader(ref, reader):
        found["batch_norm"] = made_by.operation
        ref, reader, made_by = past_identities(made_by.inputs[0], made_by)
    if made_by is not None and _plain(made_by, _CONVOLUTIONS) and only_reader(ref, reader):
        found["conv"] = made_by.operation
        ref, reader, made_by = past_identities(made_by.inputs[0], made_by)
        if made_by is not None and _plain(made_by, _PADDINGS) and only_reader(ref, reader):
            found["padding"] = made_by.operation
            ref = made_by.inputs[0]
    if not found:
        return Branch(source=start)  # the identities it passed belong to the source
    return Branch(source=ref, identities=tuple(identities), **found)


def _is_identity(call):
    """Whether `call` returns its one input unchanged: an `Identity` layer, or an `Activation` of the identity."""
    operation = call.operation
    if len(call.inputs) != 1 or call.kwargs.get("mask") is not None:
        return False
    if type(operation) is keras.layers.Identity:
        return True
    return type(operation) is keras.layers.Activation and kinds.is_identity(operation.activation)


def _plain(call, kinds_of):
    """Whether `call` calls a layer of exactly one of Keras's classes `kinds_of`, on one tensor."""
    operation = call.operation
    return (
        isinstance(operation, kinds_of)
        and type(operation) in (kinds_of if isinstance(kinds_of, tuple) else (kinds_of,))
        and len(call.inputs) == 1
    )


def _plan(call, branches, sums, graph):
    """Merge the branches of the sum `call`, or keep them with the reason."""
    name = _name(call.operation)
    listed = tuple(str(branch) for branch in branches)
    dropped = tuple(layer for branch in branches for layer in [*branch.layers, *branch.identities]) + tuple(
        each.operation for each in sums[1:]
    )

    def kept(reason):
        return Plan(Reparameterization(name, listed, False, reason=reason), call, tuple(branches), ())

    if len({id(branch.source) for branch in branches}) > 1:
        return kept("its terms are not all computed from one tensor")
    convs = [branch.conv for branch in branches if branch.conv is not None]
    first = convs[0]
    for conv in convs:
        if type(conv) is not type(first):
            return kept(f"{kinds.describe(conv)} and {kinds.describe(first)} are different kinds of convolution")
        if not kinds.is_identity(conv.activation):
            return kept(f"{kinds.describe(conv)} applies its activation inside the branch")
        if len(conv.weights) != 1 + int(conv.use_bias):
            return kept(f"{kinds.describe(conv)} has weights beyond kernel and bias (quantized or LoRA)")
        for option in ("strides", "data_format", "groups", "depth_multiplier", "filters"):
            if getattr(conv, option, None) != getattr(first, option, None):
                return kept(f"{kinds.describe(conv)} and {kinds.describe(first)} differ in {option}")
        if any(rate != 1 for rate in conv.dilation_rate):
            return kept(f"{kinds.describe(conv)} is dilated")
        if any(size % 2 == 0 for size in conv.kernel_size):
            return kept(f"{kinds.describe(conv)} has an even kernel size, which has no centre")
        why = kinds.why_not_copied(conv)
        if why is not None:
            return kept(f"{kinds.describe(conv)} cannot be re-created from its config: {why}")
    shape = None if branches[0].source.spec is None else tuple(branches[0].source.spec.shape)
    if shape is None:
        return kept("the shape of the tensor its branches read is not known")
    rank = len(shape)
    channel_axis = kinds.channel_axis(first) % rank
    for branch in branches:
        bn = branch.batch_norm
        if bn is not None and not kinds.same_axis(bn.axis, channel_axis, rank):
            return kept(f"the axis {bn.axis} of {kinds.describe(bn)} is not the channel axis {channel_axis}")
    spatial = [axis for axis in range(1, rank) if axis != channel_axis]
    sizes = [shape[axis] for axis in spatial]
    geometry = []
    for branch in branches:
        if branch.conv is None:
            if any(stride != 1 for stride in first.strides):
                return kept(f"the branch {branch} is an identity, which cannot stride like {kinds.describe(first)}")
            if shape[channel_axis] != _filters(first, shape[channel_axis]):
                return kept(f"the branch {branch} is an identity, and {kinds.describe(first)} changes the channels")
            geometry.append(((1,) * len(spatial), ((0, 0),) * len(spatial)))
            continue
        pads = _pads(branch, sizes)
        if pads is None:
            return kept(
                f"{kinds.describe(branch.conv)} pads 'same' with a stride, by an amount the input size decides, "
                "and that size is not known"
            )
        geometry.append((tuple(branch.conv.kernel_size), pads))
    kernel_size = tuple(max(sizes_) for sizes_ in zip(*(size for size, _ in geometry)))
    offsets = {
        tuple((before - (k - 1) // 2, after - (k - 1) // 2) for k, (before, after) in zip(size, pads))
        for size, pads in geometry
    }
    if len(offsets) > 1:
        return kept("the windows of its branches are not centred on the same input position (their paddings differ)")
    (offset,) = offsets
    merged_pads = tuple(
        (before + (k - 1) // 2, after + (k - 1) // 2) for k, (before, after) in zip(kernel_size, offset)
    )
    if any(each < 0 for pair in merged_pads for each in pair):
        return kept("the merged convolution would need a negative padding")
    output_shape = graph.output_shape(call.operation) if graph is not None else None
    if guards.bias_lands_on_the_wrong_axis(first, output_shape):
        return kept(f"{kinds.describe(first)} would need a bias this backend adds on the wrong axis")
    if guards.fuses_wrongly(graph, first, call.operation):
        return kept(guards.FUSION_REASON.format(layer=f"the convolution merged from {name}"))
    biggest = next((conv for conv in convs if tuple(conv.kernel_size) == kernel_size), first)
    decision = Reparameterization(name, listed, True, into=biggest.name)
    return Plan(decision, call, tuple(branches), dropped, kernel_size, merged_pads)


def _name(operation):
    return getattr(operation, "name", type(operation).__name__)


def _filters(conv, channels_in):
    if isinstance(conv, _DEPTHWISE):
        return channels_in * conv.depth_multiplier
    return conv.filters


def _pads(branch, sizes):
    """((before, after), ...) per spatial axis that the branch pads its input by, or None if unknown."""
    conv = branch.conv
    explicit = [(0, 0)] * len(sizes)
    if branch.padding is not None:
        padding = branch.padding.padding
        explicit = [tuple(pair) if isinstance(pair, (tuple, list)) else (pair, pair) for pair in padding]
    if conv.padding == "valid":
        own = [(0, 0)] * len(sizes)
    elif conv.padding == "causal":
        own = [(conv.kernel_size[0] - 1, 0)]
    else:  # "same": TensorFlow's rule, which every Keras backend follows
        own = []
        for size, kernel, stride, pad in zip(sizes, conv.kernel_size, conv.strides, explicit):
            if stride == 1:
                total = kernel - 1
            elif size is None:
                return None
            else:
                padded = size + pad[0] + pad[1]
                total = max((math.ceil(padded / stride) - 1) * stride + kernel - padded, 0)
            own.append((total // 2, total - total // 2))
    return tuple((a[0] + b[0], a[1] + b[1]) for a, b in zip(explicit, own))


def merged_weights(plan, channels_in):
    """The kernel and bias of the one convolution `plan`'s branches sum to, as float64 arrays.

    Each branch is `scale * (W * x + b) + shift` per output channel (a
    missing convolution is the identity kernel, a missing BatchNormalization
    scale 1 and shift 0); kernels are zero-padded to `plan.kernel_size`,
    centred, and summed, as are the biases.

    Examples:
        >>> x = keras.Input((5, 5, 2))
        >>> conv = keras.layers.Conv2D(2, 1, use_bias=False, name="c")
        >>> model = keras.Model(x, keras.layers.Add()([conv(x), x]))
        >>> (plan,) = decide(graph_module.walk(model))
        >>> kernel, bias = merged_weights(plan, 2)
        >>> bool(np.allclose(kernel[0, 0], keras.ops.convert_to_numpy(conv.kernel)[0, 0] + np.eye(2)))
        True
    """
    first = next(branch.conv for branch in plan.branches if branch.conv is not None)
    depthwise = isinstance(first, _DEPTHWISE)
    layout = "depthwise" if depthwise else "last"
    filters = _filters(first, channels_in)
    total_kernel, total_bias = 0.0, np.zeros(filters, np.float64)
    for branch in plan.branches:
        if branch.conv is None:
            kernel = _identity_kernel(first, channels_in, len(plan.kernel_size))
            bias = np.zeros(filters, np.float64)
        else:
            kernel = np.asarray(keras.ops.convert_to_numpy(branch.conv.kernel), np.float64)
            bias = (
                np.asarray(keras.ops.convert_to_numpy(branch.conv.bias), np.float64)
                if branch.conv.use_bias
                else np.zeros(filters, np.float64)
            )
        if branch.batch_norm is not None:
            scale, shift = fold_math.affine_of(branch.batch_norm)
            kernel = fold_math.scale_kernel(kernel, scale, layout)
            bias = scale * bias + shift
        total_kernel = total_kernel + _centred(kernel, plan.kernel_size)
        total_bias = total_bias + bias
    return total_kernel, total_bias


def _identity_kernel(conv, channels, spatial_rank):
    """A 1 x ... x 1 kernel in `conv`'s layout that copies each input channel to the same output channel."""
    if isinstance(conv, _DEPTHWISE):
        kernel = np.zeros((1,) * spatial_rank + (channels, 1))
        kernel[(0,) * spatial_rank + (slice(None), 0)] = 1.0
        return kernel
    per_group = channels // conv.groups
    kernel = np.zeros((1,) * spatial_rank + (per_group, channels))
    for channel in range(channels):
        kernel[(0,) * spatial_rank + (channel % per_group, channel)] = 1.0
    return kernel


def _centred(kernel, size):
    """`kernel` zero-padded on its spatial axes to `size`, centred."""
    pads = [((target - now) // 2, (target - now) // 2) for now, target in zip(kernel.shape[: len(size)], size)]
    return np.pad(kernel, pads + [(0, 0), (0, 0)])
