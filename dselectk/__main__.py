"""Command line: ``python -m dselectk demo`` (also the ``dselectk`` console script).

The help texts are plain text (argparse prints them as written, so no reST markup in them)."""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = ("DSelect-k and other Mixture-of-Experts gates as C kernels on NumPy arrays. "
               "Run 'dselectk demo' to train two small multi-task models, 'dselectk info' to see how "
               "the extension was built.")


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dselectk", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"dselectk {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train MMoE models with DSelect-k and Top-k gates on generated multi-task data",
                          description="Train MMoE models with DSelect-k and Top-k gates on generated multi-task "
                          "data, then print each task's test MSE, the experts each task selected and the wall "
                          "time (a few seconds).")
    demo.add_argument("--gates", action="store_true",
                      help="instead, train lone gates to find the 2 of 16 fixed experts that generated the data")
    demo.add_argument("--epochs", type=int, default=12, help="MMoE training epochs (default 12)")
    demo.add_argument("--steps", type=int, default=800, help="Adam steps per gate with --gates (default 800)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and the models (default 0)")
    sub.add_parser("info", help="print how the extension was built (OpenMP, BLAS, threads)",
                   description="Print how the extension was built (OpenMP, BLAS, threads).")
    args = parser.parse_args(argv)
    if args.command == "info":
        import dselectk

        for key, value in dselectk.build_info().items():
            print(f"{key}: {value}")
        return 0
    if args.steps < 1 or args.epochs < 1:
        parser.error("--steps and --epochs must be >= 1")
    import time

    from .demo import run, run_mmoe

    t0 = time.perf_counter()
    if args.gates:
        run(steps=args.steps, seed=args.seed)
    else:
        run_mmoe(epochs=args.epochs, seed=args.seed)
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
