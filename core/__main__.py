"""``python -m posttrain``: the ``posttrain`` command."""

import sys

from .cli import main

sys.exit(main())
