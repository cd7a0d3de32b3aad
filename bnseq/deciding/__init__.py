"""Deciding: plain values in, plain values out; no model is built or run here.

`rules` checks `batch_norm` options and holds the placement rules (BN001-BN004)
that `bnseq.Sequential` warns about; `findings` is `bnseq.lint`, which reports
them over a whole model; `fold_math` is the fold as NumPy functions of weights;
`fold_plan` decides, for each BatchNormalization, whether it folds back into the
layer before it, forward into the layer after it, or stays, and why
(`bnseq.fold_report`); `fine_tuning` decides what `fit` will do with each
BatchNormalization (lint's BN005-BN008) and `overview` is `bnseq.summary`;
`fold_through` and `guards` are the folds across pooling and merges and where a
backend bug forbids one; `branches` is `bnseq.reparameterize_report`;
`quantize_plan` decides what `bnseq.quantize_aware` makes of each layer.

May import: `bnseq.reading` and the cross-cutting modules.
"""
