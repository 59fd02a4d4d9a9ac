"""``python -m attncc`` runs the command line."""

from attncc.cli import main

main()
