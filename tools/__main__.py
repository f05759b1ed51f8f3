"""``python -m tools ...`` is the same as ``vlmr ...``."""

import sys

from tools.cli import main

sys.exit(main())
