"""``python -m notes``: the same as the ``polydatum-notes`` command."""

import sys

from notes.cli import main

sys.exit(main())
