"""The plan of a recalibration, on plain values: levels, the calls of each step, the tensors each cut keeps.

Level 1 holds the BatchNormalization layers with no BatchNormalization
upstream, level 2 those with only level 1 upstream, and so on. Step `k`
computes the calls that need statistics up to level `k` only; the cut after
it is the tensors later steps read. The plan and its compiled steps are kept
for the model (weakly), so that a second call on the same model compiles
nothing. `segments.py` runs the plan.
"""

import collections
import dataclasses
import weakref

from bnseq import probes
from bnseq.reading import graph as graph_module


@dataclasses.dataclass(eq=False)
class _Plan:
    """The flattened model, its levels, and the compiled steps made so far."""

    flat: graph_module.Flat
    levels: int
    by_level: dict  # level -> the layers measured at that level
    made: dict  # Ref -> the step that computes it (-1 for model inputs)
    call_step: dict  # id(Call) -> its step
    last_use: dict  # Ref -> the last step that reads it
    targets: dict  # level -> [(layer, Ref of its input)] visible BatchNormalization calls
    probes: dict  # level -> [(Call, [hidden layers])] subclassed calls to run with capture
    hidden: list  # every hidden layer measured
    needed: int  # calls one forward pass of the needed part makes (subclassed layers probed included)
    jit_compile: bool
    functions: dict = dataclasses.field(default_factory=dict)


_PLANS = weakref.WeakKeyDictionary()  # model -> {key: _Plan}; a plan holds no reference to its model


def plan_for(model, flat, batch_norms, chained, order=None):
    jit_compile = probes.needs_xla(model)
    key = (
        tuple((id(call.operation), len(call.inputs), len(call.outputs)) for call in flat.calls),
        tuple(id(layer) for layer in batch_norms),
        chained,
        jit_compile,
        tuple(id(layer) for layer in order or ()),
    )
    opaque = any(call.operation is model for call in flat.calls)  # a subclassed model: its own leaf
    plans = None if opaque else _PLANS.setdefault(model, {})
    if plans is not None and key in plans:
        return plans[key]
    plan = _make_plan(flat, batch_norms, chained, jit_compile, order)
    if plans is not None:
        plans.clear()  # one plan per model: an old one is for a model that has changed since
        plans[key] = plan
    return plan


def _make_plan(flat, batch_norms, chained, jit_compile, order=None):
    # A cached plan must not keep its model alive: its calls forget their parents.
    flat = dataclasses.replace(flat, calls=[dataclasses.replace(call, parent=None) for call in flat.calls])
    wanted = {id(layer) for layer in batch_norms}
    position = {id(layer): index for index, layer in enumerate(order or ())}
    hidden_in = {}  # id(Call) -> the measured layers hidden inside its operation, in the order they run
    for call in flat.calls:
        inner = [each for each in graph_module.hidden_batch_norms(call.operation) if id(each) in wanted]
        if order is not None:
            inner = sorted((each for each in inner if id(each) in position), key=lambda each: position[id(each)])
        if inner:
            hidden_in[id(call)] = inner
    level_of_layer, call_level = _levels(flat, wanted, hidden_in, chained)
    levels = max(level_of_layer.values(), default=0)
    targets, probes_at = collections.defaultdict(list), collections.defaultdict(list)
    by_level = collections.defaultdict(list)
    for layer in batch_norms:
        if id(layer) in level_of_layer:
            by_level[level_of_layer[id(layer)]].append(layer)
    for call in flat.calls:
        if id(call.operation) in wanted:
            targets[level_of_layer[id(call.operation)]].append((call.operation, _first_ref(call)))
        for layer in hidden_in.get(id(call), ()):
            group = probes_at[level_of_layer[id(layer)]]
            if not group or group[-1][0] is not call:
                group.append((call, []))
            group[-1][1].append(layer)

    # The needed calls: what the measured inputs depend on, nothing after them.
    needed, refs = [], set()
    for level in range(1, levels + 1):
        refs.update(ref for _, ref in targets[level])
        refs.update(ref for call, _ in probes_at[level] for ref in call.inputs)
    for call in reversed(flat.calls):
        if any(ref in refs for ref in call.outputs):
            needed.append(call)
            refs.update(call.inputs)
    needed.reverse()

    made = {ref: -1 for ref in flat.inputs}
    call_step = {}
    last_use = collections.defaultdict(lambda: -1)
    for call in needed:
        step = call_level[id(call)]
        call_step[id(call)] = step
        for ref in call.outputs:
            made[ref] = step
        for ref in call.inputs:
            last_use[ref] = max(last_use[ref], step)
    for level in range(1, levels + 1):  # measured in the step before their level
        for _, ref in targets[level]:
            last_use[ref] = max(last_use[ref], level - 1)
        for call, _ in probes_at[level]:
            for ref in call.inputs:
                last_use[ref] = max(last_use[ref], level - 1)
    return _Plan(
        flat=flat,
        levels=levels,
        by_level=dict(by_level),
        made=made,
        call_step=call_step,
        last_use=dict(last_use),
        targets=dict(targets),
        probes=dict(probes_at),
        hidden=[layer for layers in hidden_in.values() for layer in layers],
        needed=len({id(call) for call in needed} | {id(call) for calls in probes_at.values() for call, _ in calls}),
        jit_compile=jit_compile,
    )


def _levels(flat, wanted, hidden_in, chained):
    """Levels of the measured layers and of every call.

    A measured layer's level is one more than the highest level of its inputs
    (over all its calls, for a shared layer); with `chained`, its outputs have
    its level, and `h` measured layers hidden in a subclassed layer are taken
    as a chain of `h` levels, since what its `call` does is unknown.
    Without `chained`, measured layers do not raise the level after them.
    Shared layers can raise levels seen earlier, so this repeats until
    nothing changes; a layer whose level keeps rising feeds itself.
    """
    level_of_layer = {}
    for _ in range(len(flat.calls) + 2):
        before = dict(level_of_layer)
        level_of_ref, call_level = {ref: 0 for ref in flat.inputs}, {}
        for call in flat.calls:
            level = max((level_of_ref.get(ref, 0) for ref in call.inputs), default=0)
            if id(call.operation) in wanted:
                own = max(level_of_layer.get(id(call.operation), 0), level + 1)
                level_of_layer[id(call.operation)] = own
                level = own if chained else level
            for index, layer in enumerate(hidden_in.get(id(call), ()), start=1):
                own = max(level_of_layer.get(id(layer), 0), level + (index if chained else 1))
                level_of_layer[id(layer)] = own
            if chained and id(call) in hidden_in:
                level = max(level, max(level_of_layer[id(layer)] for layer in hidden_in[id(call)]))
            call_level[id(call)] = level
            for ref in call.outputs:
                level_of_ref[ref] = level
        if level_of_layer == before:
            return level_of_layer, call_level
    rising = [call.operation for call in flat.calls if id(call.operation) in wanted]
    rising = [layer for layer in rising if level_of_layer[id(layer)] != before.get(id(layer))]
    name = rising[0].name if rising else "?"
    raise ValueError(
        f"BatchNormalization '{name}' is called on a tensor computed from its own output, so its "
        "statistics would depend on themselves: no exact value exists. Give each call its own "
        "BatchNormalization layer."
    )


def _first_ref(call):
    """The `Ref` of a BatchNormalization call's input."""
    first = call.args[0] if call.args else call.kwargs.get("inputs")
    return first if isinstance(first, graph_module.Ref) else call.inputs[0]


@dataclasses.dataclass(eq=False)
class _Step:
    """One compiled function: the calls of steps `(start, stop]`, moments, and the cut it keeps."""

    inputs: list
    calls: list
    targets: list  # [(layer, Ref)]
    probes: list  # [(Call, [layers])]
    keep: list

    @property
    def measured(self):
        """The layer of each moment the step's function returns: the targets', then the probed."""
        return [layer for layer, _ in self.targets] + [layer for _, layers in self.probes for layer in layers]


def step_calls(plan, start, stop, store):
    """The calls after the cut of step `start` that measure level `stop + 1`."""
    targets = plan.targets.get(stop + 1, [])
    probes_here = plan.probes.get(stop + 1, [])
    wanted = {ref for _, ref in targets} | {ref for call, _ in probes_here for ref in call.inputs}
    keep = []
    if store:
        keep = [ref for ref in cut(plan, stop) if plan.made[ref] > start]
        wanted.update(keep)
    calls = []
    for call in reversed(plan.flat.calls):
        step = plan.call_step.get(id(call))
        if step is not None and start < step <= stop and any(ref in wanted for ref in call.outputs):
            calls.append(call)
            wanted.update(call.inputs)
    calls.reverse()
    inputs = [ref for ref in cut(plan, start) if ref in wanted]
    return _Step(inputs=inputs, calls=calls, targets=targets, probes=probes_here, keep=keep)


def cut(plan, step):
    """The tensors made by step `step` or before and read after it (in a fixed order)."""
    return [ref for ref, made in plan.made.items() if made <= step < plan.last_use.get(ref, -1)]
