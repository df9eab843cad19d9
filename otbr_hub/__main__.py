"""``python -m otbr_hub`` runs the CLI."""

import sys

from .cli import main

sys.exit(main())
