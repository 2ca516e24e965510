"""``python -m pocketpeft`` = the ``pocketpeft`` command."""

import sys

from pocketpeft.apps.cli import main

sys.exit(main())
