"""Merging methods: ensembles and parameter merges of independently trained models."""

__all__ = ["BTMEnsemble"]


def __getattr__(name):
    # BTMEnsemble loads its members through transformers: import it on first use only.
    if name == "BTMEnsemble":
        from flexmoe.merge.btm import BTMEnsemble

        return BTMEnsemble
    raise AttributeError(f"module 'flexmoe.merge' has no attribute {name!r}")

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
