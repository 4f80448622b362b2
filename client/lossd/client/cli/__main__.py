"""``python -m lossd.client.cli``: the ``lossd`` command."""

import sys

from lossd.client.cli import main

sys.exit(main())
