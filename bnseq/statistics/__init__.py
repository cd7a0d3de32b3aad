"""Statistics: recalibrate, and what it runs to measure each BatchNormalization's input exactly.

`recalibration` is `bnseq.recalibrate` and its report; `segments` measures
level by level over the plan `plans` makes (which calls each step makes, which
tensors cross each cut); `compiled` turns a step into a function compiled as
`predict` compiles; `data` takes what `predict` takes; `collective` pools each
level's statistics over the processes of a multi-process run.

May import: `bnseq.reading` and the cross-cutting modules. It builds no model
and decides nothing about placement, so it needs neither `deciding` nor
`changing`; `changing` uses it to calibrate `batch_normalize(data=...)`.
"""
