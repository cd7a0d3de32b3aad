"""Run the benchmarks: `python benchmarks/run.py [--quick] [--only NAME ...]`.

Prints each benchmark's markdown table and, in a full run, writes them all to
benchmarks/results.md with the machine they were measured on. `--quick` runs
tiny versions only to check that the benchmarks still work (CI does this);
its figures mean nothing.
"""

import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

BENCHMARKS = {
    "build": ("Building by add()", "benchmarks.build"),
    "load": ("Loading with keras.saving.load_model", "benchmarks.load"),
    "train": ("Training: one epoch of fit", "benchmarks.train"),
    "memory": ("Memory: biases removed", "benchmarks.memory"),
    "fold": ("Inference after folding", "benchmarks.fold_inference"),
    "recalibrate": ("Recalibrating statistics", "benchmarks.recalibrate"),
    "export": ("Exported models in their runtimes", "benchmarks.export"),
    "trace": ("Tracing keras-hub blocks", "benchmarks.trace"),
    "summary": ("bnseq.summary and freeze", "benchmarks.summary"),
    "placements": ("BatchNormalization left in LiteRT, 12 placements", "benchmarks.litert_placements"),
    "reparameterize": ("Reparameterized RepVGG blocks", "benchmarks.reparameterize"),
    "quantize_aware": ("Quantization-aware training, in LiteRT", "benchmarks.quantize_aware"),
}
PLOT = "build_time.png"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check they run")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.md")
    )
    args = parser.parse_args(argv)
    sections = [f"Measured on {common.machine()}.", ""]
    for key in args.only or BENCHMARKS:
        title, module_name = BENCHMARKS[key]
        start = time.perf_counter()
        module = importlib.import_module(module_name)
        markdown, results = module.run(quick=args.quick)
        section = f"## {title}\n\n{markdown}\n\n({time.perf_counter() - start:.0f} s to measure)\n"
        if key == "build" and not args.quick:
            plot_path = os.path.join(os.path.dirname(args.out), PLOT)
            module.plot(results, plot_path)
            section += f"\n![Build time against depth]({PLOT})\n"
        print(section, flush=True)
        sections.append(section)
    if not args.quick:
        with open(args.out, "w") as file:
            file.write("# Benchmark results\n\n" + "\n".join(sections))
        print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
