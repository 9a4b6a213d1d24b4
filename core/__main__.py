"""`python -m memwise`: the same command line as the `memwise` script."""

import sys

from memwise.cli import main

sys.exit(main())
