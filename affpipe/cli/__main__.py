"""``python -m affpipe.cli`` (what torchrun runs): the command line."""

from affpipe.cli import main

main()
