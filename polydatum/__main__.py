"""``python -m polydatum inspect package.module:dm``: the same as the ``polydatum`` command."""

import sys

from polydatum._cli import main

# Guarded: tools that import every module of the package (docs, test walkers)
# must not run the command line.
if __name__ == "__main__":
    sys.exit(main())
