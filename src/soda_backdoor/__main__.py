"""``python -m soda_backdoor`` runs the ``soda`` command."""

import sys

from .cli.main import main

sys.exit(main())
