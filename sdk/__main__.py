"""``python -m pocketpeft`` = the ``pocketpeft`` command."""

import sys

from .cli import main

sys.exit(main())
