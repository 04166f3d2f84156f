"""``python -m multifd``: the command line."""

from multifd.cli import main

main()
