"""``python -m labelwise`` is the ``labelwise`` command."""

import sys

from labelwise.cli import main

sys.exit(main())
