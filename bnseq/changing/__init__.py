"""Changing: the only part that builds Keras objects, applying what `deciding` decided.

`rewrite` is the one rewrite engine (a linear layer split into its unit, and a
model rebuilt from per-layer decisions, every other layer carried over as the
same object); `sequential`, `units`, `marks` and `layers` are the three routes of
writing BatchNormalization (`bnseq.Sequential`, `with_batch_norm` /
`without_batch_norm`, `bnseq.BatchNormalization`); `convert` is
`bnseq.batch_normalize`; `folding` is `bnseq.fold`; `freezing` is `bnseq.freeze`
and `bnseq.unfreeze`; `reparameterizing` is `bnseq.reparameterize`;
`quantized_layers` and `quantizing` are the layers of a quantize-aware model and
`bnseq.quantize_aware`, which builds one.

May import: `bnseq.reading`, `bnseq.deciding`, `bnseq.statistics` (to calibrate
on data) and the cross-cutting modules.
"""
