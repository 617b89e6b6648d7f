"""The `ranksearch` commands: argument parsing, exit codes and what the terminal shows; the
logic lives in the other packages.

Each command imports what only it needs (the search loop and torch for `run`, MLflow's model
code for the answer, plotting for `report`) inside its function: `ranksearch --help` and
`validate` then start in about a second instead of four. This is the one place imports are
deferred on purpose; everywhere else they sit at the top of the module.
"""

from ranksearch.cli.commands import main

__all__ = ["main"]
