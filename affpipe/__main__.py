"""``python -m affpipe`` runs the command line."""

from affpipe.cli import main

main()
