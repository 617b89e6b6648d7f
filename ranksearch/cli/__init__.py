"""The `ranksearch` commands: argument parsing, exit codes and what the terminal shows; the
logic lives in the other packages.
"""

from ranksearch.cli.commands import main

__all__ = ["main"]
