"""``python -m attnopt``: the same command line as the ``attnopt`` script."""

import sys

from attnopt.cli import main

sys.exit(main())
