"""``python -m rankwise``: the same entry point as the ``rankwise`` console script."""
import sys

from .cli import main

sys.exit(main())
