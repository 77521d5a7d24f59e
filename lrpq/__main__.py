"""``python -m lrpq`` is the same as the ``lrpq`` console script."""

import sys

from lrpq.cli import main

sys.exit(main())
