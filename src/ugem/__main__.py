"""`python -m ugem` is the `ugem` command."""

import sys

from .cli import main

sys.exit(main())
