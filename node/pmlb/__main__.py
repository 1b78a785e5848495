"""``python -m pmlb`` is the ``pmlb`` command."""

import sys

from pmlb.cli import main

sys.exit(main())
