"""`python -m modernbert_embed ...`: the same command line as `modernbert-embed`."""

import sys

from .cli import main

sys.exit(main())
