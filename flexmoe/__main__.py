"""``python -m flexmoe`` runs the ``flexmoe`` command line."""

from flexmoe.cli import main

main()
