"""The `bnseq` command line: `bnseq demo | lint | summary | fold | recalibrate | export`."""

import argparse
import dataclasses
import json
import os
import stat
import sys
import tempfile

import bnseq
from bnseq.notices import first_line

UNSAFE_HELP = (
    "load files with Lambda layers (Keras's safe_mode=False, which runs the "
    "Python code stored in the file): only for files you trust"
)


def _parser():
    parser = argparse.ArgumentParser(
        prog="bnseq",
        description="Batch normalization in the right place for Keras 3.",
    )
    parser.add_argument(
        "--version", action="version", version=f"bnseq {bnseq.__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train three networks on the digits and show what placement does",
        description="Train one network three ways on scikit-learn's 8x8 digits "
        "(no batch normalization; the naive placement after the activation, "
        "biases kept; bnseq.Sequential(batch_norm=True)), print a table, fold "
        "the bnseq network, lint the naive one, and plot test accuracy against "
        "training step. Needs scikit-learn and matplotlib (the demo extra).",
    )
    demo.add_argument("--epochs", type=_positive, default=15, help="epochs per network (default 15)")
    demo.add_argument("--seed", type=int, default=0, help="data split and initialization seed (default 0)")
    demo.add_argument(
        "--out", default="bnseq-demo.png", help="where to save the plot (default: bnseq-demo.png in the current folder)"
    )
    lint = commands.add_parser(
        "lint",
        help="report misplaced BatchNormalization in saved models",
        description="Report misplaced BatchNormalization layers in .keras "
        "files, one line per finding (FILE: LAYER: CODE MESSAGE). Exit status: "
        "0 when clean, 1 when there are findings, 2 when a file cannot be read.",
    )
    lint.add_argument("paths", nargs="+", metavar="PATH", help=".keras files")
    lint.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="text (the default): one line per finding; json: a list of "
        "objects with file, layer, code, message and producer",
    )
    lint.add_argument("--unsafe", action="store_true", help=UNSAFE_HELP)
    summary = commands.add_parser(
        "summary",
        help="a table of every BatchNormalization: its mode under fit, its fold, its findings",
        description="Print one row per BatchNormalization of a .keras file (inside traced subclassed "
        "layers too): where it is, its axis, what fit will do with it (trains statistics, frozen, "
        "inference, or a training=False this Keras overrides), what fold will do with it, and its lint "
        "codes. Exit status: 0 when printed, 2 when the file cannot be read.",
    )
    summary.add_argument("path", metavar="PATH", help="a .keras file")
    summary.add_argument("--batch-size", type=_positive, help="the batch size fit will use (for BN008)")
    summary.add_argument(
        "--format", choices=("text", "json"), default="text", help="text (the default): the table; json: the rows"
    )
    summary.add_argument("--unsafe", action="store_true", help=UNSAFE_HELP)
    fold = commands.add_parser(
        "fold",
        help="fold BatchNormalization into the layers before it, for inference",
        description="Write IN.keras with every BatchNormalization that can be "
        "folded folded into the linear layer before it, as OUT.keras (plain "
        "Keras layers). With --reparameterize, sums of parallel conv + "
        "BatchNormalization branches (RepVGG, MobileOne) are first merged into "
        "one convolution each. Prints how many were folded (and merged) and the "
        "largest output difference on a random probe. Exit status: 0 when "
        "written, 1 when --strict finds a BatchNormalization that cannot fold, "
        "2 when a file cannot be read or written.",
    )
    fold.add_argument("input", metavar="IN.keras")
    fold.add_argument("output", metavar="OUT.keras")
    fold.add_argument("--unsafe", action="store_true", help=UNSAFE_HELP)
    fold.add_argument(
        "--strict",
        action="store_true",
        help="fail, writing nothing, if any BatchNormalization cannot fold",
    )
    fold.add_argument(
        "--reparameterize",
        action="store_true",
        help="first merge summed conv + BatchNormalization branches into one convolution (bnseq.reparameterize)",
    )
    export = commands.add_parser(
        "export",
        help="fold, export to ONNX, LiteRT, SavedModel or .keras, and check it in its runtime",
        description="Fold IN.keras, export it with Keras's Model.export to OUT (.onnx, .tflite, .keras, "
        "or a directory for a TensorFlow SavedModel), run the artifact in its runtime on a sample and "
        "compare with the model, inputs and outputs matched by name; OUT is written only when the check "
        "passes. With --quantize int8 or float16 (.tflite only), the LiteRT converter quantizes the folded "
        "model (int8 calibrated on --data) and the quantized model is checked against the float one on "
        "--data. Prints the report. Exit status: 0 when written and within the tolerance, 1 when the "
        "runtime's outputs differ by more (the artifact is kept as OUT's name with .failed-check), 2 when "
        "a file cannot be read or written, OUT is IN, or a runtime is missing.",
    )
    export.add_argument("input", metavar="IN.keras")
    export.add_argument("output", metavar="OUT")
    export.add_argument("--format", choices=("onnx", "litert", "tf_saved_model", "keras"), help="instead of the suffix")
    export.add_argument("--no-fold", action="store_true", help="export the model as it is")
    export.add_argument(
        "--sample",
        metavar="FILE",
        help="inputs to check on: .npy for a model with one input, or .npz with one array per input, keyed by "
        "the model's input names (default: a random batch of 2)",
    )
    export.add_argument("--compare", action="store_true", help="also time an unfolded export")
    export.add_argument(
        "--rtol",
        type=float,
        help="tolerance, relative to the largest output (default 1e-4 for float32 models, 1e-2 for float16, "
        "5e-2 for bfloat16; with --quantize, of the mean difference: 0.1 for int8, 1e-2 for float16)",
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace a SavedModel directory that is not empty"
    )
    export.add_argument(
        "--quantize", choices=("int8", "float16"), help="quantized LiteRT (.tflite): needs --data"
    )
    export.add_argument(
        "--data",
        metavar="FILE",
        help="for --quantize: inputs (.npy, or .npz keyed by input names) to calibrate int8 on and to check "
        "the quantized model against the float one",
    )
    export.add_argument(
        "--recalibrate", action="store_true", help="recalibrate the statistics on --data before folding"
    )
    export.add_argument(
        "--min-agreement",
        type=float,
        default=0.97,
        help="with --quantize: the lowest top-1 agreement with the float model that passes (0.97)",
    )
    export.add_argument("--unsafe", action="store_true", help=UNSAFE_HELP)
    recalibrate = commands.add_parser(
        "recalibrate",
        help="set BatchNormalization statistics to their exact values over data",
        description="Write IN.keras as OUT.keras with every BatchNormalization's moving mean and "
        "variance set to the exact mean and variance of its input over the data (inference mode, "
        "earlier layers recalibrated first); prints a table of the changes. --data is a .npy "
        "array of model inputs, or a .npz with one array per input, keyed by the input names (or "
        "in the model's input order). Exit status: 0 when written, 2 when a file cannot be read or written.",
    )
    recalibrate.add_argument("input", metavar="IN.keras")
    recalibrate.add_argument("output", metavar="OUT.keras")
    recalibrate.add_argument("--data", required=True, metavar="FILE", help=".npy or .npz of model inputs")
    recalibrate.add_argument("--batch-size", type=_positive, default=32, help="batch size (default 32)")
    recalibrate.add_argument(
        "--cache-limit",
        type=_size,
        default="auto",
        metavar="SIZE",
        help="activations kept between segments: bytes, or with K, M or G (powers of 1024); "
        "default auto (half the memory available)",
    )
    recalibrate.add_argument("--unsafe", action="store_true", help=UNSAFE_HELP)
    return parser


def main(argv=None):
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            from bnseq import demo
        except ImportError as error:  # pragma: no cover - depends on the install
            return _fail(f"{error}. Install the demo extra: pip install 'bnseq[demo]'")
        problem = _unwritable(args.out)
        if problem:  # before minutes of training, not after
            return _fail(f"cannot write the plot to '{args.out}': {problem}")
        return demo.run(epochs=args.epochs, seed=args.seed, out=args.out)
    if args.command == "lint":
        return _lint(args.paths, args.format, not args.unsafe)
    if args.command == "summary":
        return _summary(args)
    commands = {"fold": _fold, "export": _export, "recalibrate": _recalibrate}
    if args.command not in commands:
        parser.print_help()
        return 2
    try:
        return commands[args.command](args)
    except _Failure as failure:
        return _fail(str(failure))


def _size(text):
    """`auto`, or a number of bytes with an optional K, M or G suffix."""
    if text == "auto":
        return text
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    scale = units.get(text[-1:].upper(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a size such as 500M. Received: {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative. Received: {text}")
    return value


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1. Received: {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _fail(message):
    """A one-line error on stderr, no traceback; exit status 2."""
    print(f"bnseq: error: {message}", file=sys.stderr)
    return 2


class _Failure(Exception):
    """A file or argument the command cannot use: `main` prints it as one line and returns 2."""


def _unwritable(path):
    """Why a file cannot be written at `path` (its folder is made if missing), or `None`."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        return first_line(error)
    if os.path.isdir(path):
        return "it is a directory"
    if not os.access(folder, os.W_OK):
        return f"the folder '{folder}' is not writable"
    return None


def _same_file(a, b):
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _load(args, *, keras_output=True):
    """The model in `args.input`, after checking that `args.output` can be a .keras file."""
    if keras_output and not str(args.output).endswith(".keras"):
        raise _Failure(f"the output file must end in .keras. Received: {args.output}")
    if args.command in ("fold", "export") and _same_file(args.input, args.output):
        raise _Failure(
            f"the output '{args.output}' is the input file; {args.command} writes an inference-only model and "
            "would replace the trainable one. Choose another output path."
        )
    try:
        return bnseq.reading.files.as_model(args.input, safe_mode=not args.unsafe)
    except (OSError, ValueError) as error:
        raise _Failure(first_line(error)) from None


def _save(model, path):
    """`model.save(path)` through a temporary file in the same folder (made if missing), then moved into place.

    A save that fails halfway leaves `path` as it was. The file gets the mode
    a plain `open(path, "w")` would give it: an existing file's own, else what
    the umask allows (a temporary file is made private, 0600).
    """
    problem = _unwritable(path)
    if problem:
        raise _Failure(f"cannot write '{path}': {problem}")
    folder, name = os.path.split(os.path.abspath(path))
    staged = None
    try:
        handle, staged = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial.keras", dir=folder)
        os.close(handle)
        model.save(staged)
        os.chmod(staged, _mode_for(path))
        os.replace(staged, path)
    except (OSError, ValueError) as error:
        raise _Failure(f"cannot write '{path}': {first_line(error)}") from None
    finally:
        if staged is not None and os.path.exists(staged):
            os.remove(staged)


def _mode_for(path):
    """The permission bits `open(path, "w")` would leave: the file's own if it exists, else 0666 less the umask."""
    if os.path.exists(path):
        return stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _lint(paths, output_format, safe_mode):
    """Lint every path; a file that cannot be read makes the status 2."""
    results, failed = [], False
    for path in paths:
        try:
            findings = bnseq.lint(path, safe_mode=safe_mode)
        except (OSError, ValueError) as error:
            failed = True
            _fail(first_line(error))
            continue
        results.extend((path, finding) for finding in findings)
    if output_format == "json":
        print(
            json.dumps(
                [{"file": path, **vars(finding)} for path, finding in results],
                indent=2,
            )
        )
    else:
        for path, finding in results:
            print(f"{path}: {finding}")
    if failed:
        return 2
    return 1 if results else 0


def _summary(args):
    try:
        table = bnseq.summary(args.path, safe_mode=not args.unsafe, batch_size=args.batch_size)
    except (OSError, ValueError) as error:
        return _fail(first_line(error))
    if args.format == "json":
        print(json.dumps([dataclasses.asdict(row) for row in table], indent=2))
    else:
        print(table)
    return 0


def _fold(args):
    # `bnseq.fold` is the function; the module's helpers come from bnseq.fold.
    from bnseq.changing.folding import probe_difference

    model = _load(args)
    merged, merges = model, []
    try:
        if args.reparameterize:
            merged, merges = bnseq.reparameterize_with_report(model)
        folded, report = bnseq.fold_with_report(merged, strict=args.strict)
    except ValueError as error:
        print(f"bnseq: {error}", file=sys.stderr)
        return 1
    _save(folded, args.output)
    if args.reparameterize:
        count = sum(decision.merged for decision in merges)
        print(f"Merged {count} of {len(merges)} sums of branches into one convolution each.")
        for decision in merges:
            if not decision.merged:
                print(f"  kept {decision}")
    done = sum(decision.folded for decision in report)
    print(f"Folded {done} of {len(report)} BatchNormalization layers into the layers before them.")
    for decision in report:
        if not decision.folded:
            print(f"  kept {decision}")
    difference, relative = probe_difference(model, folded)
    print(
        f"Largest output difference on a random probe: {difference:.3g} "
        f"(relative {relative:.3g})."
    )
    print(f"Wrote {args.output}")
    return 0


def _arrays(path, what):
    """A .npy file as an array, or a .npz file as a dict of arrays keyed by their names in the file."""
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError) as error:
        raise _Failure(f"cannot read the {what} '{path}': {first_line(error)}") from None


def _export(args):
    model = _load(args, keras_output=False)  # export checks the output against the format
    sample = None if args.sample is None else _arrays(args.sample, "sample")
    data = None if args.data is None else _arrays(args.data, "data")
    try:
        report = bnseq.export(
            model,
            args.output,
            format=args.format,
            fold=not args.no_fold,
            sample=sample,
            safe_mode=not args.unsafe,
            compare=args.compare,
            rtol=args.rtol,
            overwrite=args.overwrite,
            quantize=args.quantize,
            data=data,
            recalibrate=args.recalibrate,
            min_agreement=args.min_agreement,
        )
    except bnseq.ToleranceError as error:
        print(error.report)
        print(f"bnseq: {error}", file=sys.stderr)
        return 1
    except (ImportError, OSError, ValueError) as error:
        raise _Failure(first_line(error)) from None
    print(report)
    return 0


def _recalibrate(args):
    model = _load(args)
    data = _arrays(args.data, "data")
    if isinstance(data, dict):  # .npz: keyed by the model's input names, or else the inputs in the file's order
        names = [tensor.name for tensor in model.inputs]
        arrays = [data[name] for name in names] if set(data) == set(names) else list(data.values())
        data = arrays[0] if len(arrays) == 1 else arrays
    try:
        report = bnseq.recalibrate(model, data, batch_size=args.batch_size, verbose=0, cache_limit=args.cache_limit)
    except (TypeError, ValueError) as error:
        raise _Failure(f"cannot recalibrate '{args.input}' on '{args.data}': {first_line(error)}") from None
    _save(model, args.output)
    print(f"Recalibrated {len(report)} BatchNormalization layers on {args.data}.")
    print(report)
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":  # last, so that every function above is defined
    sys.exit(main())
