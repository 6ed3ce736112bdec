"""``python -m chat.cluster.loadtest``: as ``chat loadtest``."""

import sys

from chat.cluster.loadtest.cli import main

sys.exit(main())
