"""Merging methods: ensembles and parameter merges of independently trained models."""

from flexmoe.merge.btm import BTMEnsemble

__all__ = ["BTMEnsemble"]
