"""Command line: turns flags into a frozen config dataclass and calls one library function.

Library modules are imported inside each command so ``affpipe --help`` stays fast and a
missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from affpipe import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="affpipe")
@click.option("-v", "--verbose", count=True, help="More logging (-v info is default, -vv debug).")
def main(verbose: int) -> None:
    """affpipe: Aff-Wild2 at full scale — index, shard, stream, train, evaluate, benchmark."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# ---- synth ---------------------------------------------------------------------------------

# ---- index / stats -------------------------------------------------------------------------

# ---- shard / verify / show -----------------------------------------------------------------

# ---- train / evaluate / predict ------------------------------------------------------------

# ---- bench ---------------------------------------------------------------------------------

# ---- report / experiments ------------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    main()
