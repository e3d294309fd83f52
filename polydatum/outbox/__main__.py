"""``python -m polydatum.outbox package.module:outbox``: the same as ``polydatum-relay``."""

import sys

from polydatum.outbox._cli import main

# Guarded: tools that import every module of the package (docs, test walkers)
# must not start a relay.
if __name__ == "__main__":
    sys.exit(main())
