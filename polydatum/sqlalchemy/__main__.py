"""``python -m polydatum.sqlalchemy build-dataset package.module:spec`` (and check-dataset, dump-dataset)."""

import sys

from polydatum.sqlalchemy._cli import main

# Guarded: tools that import every module of the package must not run the command line.
if __name__ == "__main__":
    sys.exit(main())
