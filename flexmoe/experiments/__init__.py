"""The experiments floor: ``flexmoe demo``, FlexOlmo's comparison table run end to end, and its report.

``demo`` runs the whole flow on text this machine carries (a public model pretrained here, the
owners and the coordinator as Flower apps on the simulation engine, every baseline) and
``report`` turns the numbers into the table, findings and plots. It sits above everything it
composes, the federation included, and below only the CLI. docs/demo.md explains the report.
"""
