"""Runs ``jaxdiff train`` in a fresh process (used by the subprocess tests)."""

import argparse
import sys

from jaxdiff.training.cli import add_train_parser, run_train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="jaxdiff")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    sys.exit(run_train(parser.parse_args(sys.argv[1:])))
