"""``python -m lossd.server``: the ``lossd`` command."""

import sys

from lossd.server.cli import main

sys.exit(main())
