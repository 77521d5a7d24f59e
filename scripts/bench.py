"""Performance benchmark of lrpq: every number is a ratio measured in one run (see ``lrpq.bench``).

python scripts/bench.py [--models deit_s swin_t ../shared/models/vits14_imagenette.json] [--repeats 3]
                        [--skip-readme] [--device auto] [--json bench.json]

Headline: lrpq's default configuration (GPTQ, every rotation); nearest rounding beside it; the README's
main command timed once at the end.
"""

from __future__ import annotations

import sys

from lrpq.bench import main

if __name__ == "__main__":
    sys.exit(main())
