"""The seed's entry point: `python train.py [options]` is `elcell train [options]`."""

import sys

from elcell.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
