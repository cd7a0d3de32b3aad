"""The `bnseq` command line: `bnseq demo`."""

import argparse
import sys

import bnseq


def _parser():
    parser = argparse.ArgumentParser(
        prog="bnseq",
        description="Batch normalization in the right place for Keras 3.",
    )
    parser.add_argument(
        "--version", action="version", version=f"bnseq {bnseq.__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "demo",
        help="build one model by hand and with bnseq, and compare them",
        description="Build the README's example by hand in plain Keras and "
        "with bnseq.Sequential(batch_norm=True); print both summaries side by "
        "side and the parameters the removed biases saved.",
    )
    return parser


def main(argv=None):
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from bnseq import demo

        return demo.run()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
