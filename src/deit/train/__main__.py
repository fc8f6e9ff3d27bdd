"""``python -m deit.train`` (and ``torchrun -m deit.train``): ``deit train``."""

import sys

from deit.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
