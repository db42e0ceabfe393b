"""``python -m dspark_core.cli``."""

import sys

from dspark_core.cli import main

sys.exit(main())
