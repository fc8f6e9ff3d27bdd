"""``python -m deit.cli`` runs the command-line tool."""

import sys

from deit.cli import main

sys.exit(main())
