"""``python -m bnfix``: the same as the ``bnfix`` console script."""

import sys

from .cli import main

sys.exit(main())
