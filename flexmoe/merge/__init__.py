"""Merging methods: ensembles and parameter merges of independently trained models."""

from flexmoe.merge.btm import BTMEnsemble

__all__ = ["BTMEnsemble"]

# Parameter merges: soups, task arithmetic, TIES, DARE (one kernel, flexmoe.merge.kernel), and merge configs.
from flexmoe.merge.config import MergeConfig, MergeConfigError, merge
from flexmoe.merge.dare import dare, dare_dirs
from flexmoe.merge.kernel import MergeMethod, merge_dirs, merge_in_memory
from flexmoe.merge.soup import WeightedSoup, average, average_dirs
from flexmoe.merge.task_arithmetic import (
    TaskVector,
    analogy,
    disentanglement_error,
    disentanglement_grid,
    plot_disentanglement,
    task_arithmetic,
    task_arithmetic_dirs,
)
from flexmoe.merge.ties import ties, ties_dirs

__all__ += [
    "MergeConfig", "MergeConfigError", "MergeMethod", "TaskVector", "WeightedSoup", "analogy", "average",
    "average_dirs", "dare", "dare_dirs", "disentanglement_error", "disentanglement_grid", "merge", "merge_dirs",
    "merge_in_memory", "plot_disentanglement", "task_arithmetic", "task_arithmetic_dirs", "ties", "ties_dirs",
]  # fmt: skip
