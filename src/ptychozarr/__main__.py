"""``python -m ptychozarr``: the command line."""

import sys

from ptychozarr.cli import main

sys.exit(main())
