"""``python -m pmlb`` is the ``pmlb`` command."""

import sys

from pmlb.commands.cli import main

sys.exit(main())
