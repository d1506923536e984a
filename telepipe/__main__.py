"""``python -m telepipe``: the ``telepipe`` command."""

import sys

from telepipe.cli import main

sys.exit(main())
