"""``python -m deit.deploy.serve``: ``deit serve`` without the console script."""

import sys

from deit.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
