"""``python -m bnfix``: the same as the ``bnfix`` console script."""

import sys

try:
    from .cli import entry
except KeyboardInterrupt:  # Ctrl-C while Python is still loading bnfix: no traceback
    sys.stderr.write("bnfix: error: interrupted while starting; nothing was changed\n")
    sys.exit(130)

entry()
