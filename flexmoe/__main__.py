"""``python -m flexmoe`` runs the ``flexmoe`` command line."""

from flexmoe.cli.commands import main

main()
