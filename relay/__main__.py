"""``python -m relay`` is the same as the ``m365relay`` command."""

import sys

from relay.cli import main

sys.exit(main())
