"""`python -m ranksearch.cli ...`: the `ranksearch` command without its console script."""

import sys

from ranksearch.cli.commands import main

sys.exit(main())
