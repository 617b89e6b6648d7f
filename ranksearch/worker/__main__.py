"""`python -m ranksearch.worker spec.json` (or `--serve <study dir>`): the worker as a script."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ranksearch.worker.serve import serve
from ranksearch.worker.spec import TrialSpec
from ranksearch.worker.train import training_function


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one LoRA configuration from a spec file.")
    parser.add_argument("spec", type=Path, nargs="?", help="the trial's spec.json")
    parser.add_argument(
        "--serve",
        metavar="STUDY_DIR",
        help="a warm worker for the study in STUDY_DIR (named so `ps` tells whose it is): "
        "train the trials named on stdin",
    )
    args = parser.parse_args(argv)
    if (args.spec is None) == (args.serve is None):
        parser.error("give a spec file, or --serve")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.serve is not None:
        return serve()
    training_function(TrialSpec.read(args.spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
