"""Reading: a model becomes its calls in call order; nothing here changes a Keras object.

`graph` is the one walker (Sequential, functional and nested models flattened
into leaf calls, and those read into producer -> consumer edges); `trace` turns
subclassed layers and models into functional subgraphs that `graph` inlines;
`layout` propagates which axis holds the channels over a graph; `files` takes a
model given as a `.keras` path; `holding` says where each BatchNormalization
sits and how it is held (frozen, a recorded `training=False`).

May import: the cross-cutting modules (`bnseq.internals`, `bnseq.notices`,
`bnseq.kinds`, `bnseq.probes`), nothing of the other parts.
"""
