"""Exporting: a folded artifact written by Keras's exporters and checked in its own runtime.

`exporter` is `bnseq.export` (the target checked, the artifact staged beside
it, checked, and moved into place only then); `runtimes` writes with Keras's
exporters and loads ONNX Runtime, LiteRT, SavedModel and Keras; `checking`
pairs inputs and outputs by name and measures their differences;
`quantization` checks int8 and float16 arguments and measures what quantizing
cost, and exports a quantize-aware model from the ranges it learned.

May import: every other part (`reading`, `deciding`, `statistics`, `changing`)
and the cross-cutting modules.
"""
