"""Command line: ``affpipe`` (console script) or ``python -m affpipe`` / ``-m affpipe.cli``.

Library modules are imported inside each command so ``affpipe --help`` stays fast and a
missing optional dependency only affects the command that needs it.
"""

from affpipe.cli import bench, data, temporal, train, video  # noqa: F401  (registers the subcommands)
from affpipe.cli.main import main

__all__ = ["main"]
