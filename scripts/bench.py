"""Performance benchmark of lrpq: every number is a ratio measured in one run (see ``lrpq.bench``).

python scripts/bench.py [--models deit_s swin_t] [--repeats 3] [--json bench.json]
"""

from __future__ import annotations

import sys

from lrpq.bench import main

if __name__ == "__main__":
    sys.exit(main())
