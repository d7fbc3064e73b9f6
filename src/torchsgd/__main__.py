"""``python -m torchsgd``: the same command line as the ``torchsgd`` script."""

import sys

from torchsgd.cli.main import main

sys.exit(main())
