"""``python -m mechintro.cli``: the ``mechintro`` command."""

import sys

from mechintro.cli.main import main

sys.exit(main())
