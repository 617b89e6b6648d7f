"""`python -m ranksearch.worker spec.json` (or `--serve <study dir>`): the worker as a script."""

import sys

from ranksearch.worker import main

sys.exit(main())
