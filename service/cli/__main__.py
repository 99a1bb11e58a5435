"""``python -m service.cli``: the ``difficulty`` console script."""

import sys

from service.cli import main

sys.exit(main())
