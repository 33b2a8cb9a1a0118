"""Merging methods: ensembles and parameter merges of independently trained models."""

__all__ = ["BTMEnsemble", "MoEFinetune", "btm_average", "btx"]

# Branch-Train-Merge loads its members through transformers, and BTX's MoEFinetune needs Lightning:
# import them on first use only.
_LAZY = {"BTMEnsemble": "flexmoe.merge.btm", "btm_average": "flexmoe.merge.btm",
         "btx": "flexmoe.merge.btx", "MoEFinetune": "flexmoe.merge.btx"}  # fmt: skip


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        # Importing flexmoe.merge.btx binds the *module* to this package's name `btx`; bind the
        # functions and classes over it, so `flexmoe.merge.btx` is the function, as with dare/ties.
        for other, where in _LAZY.items():
            if where == _LAZY[name]:
                globals()[other] = getattr(module, other)
        return globals()[name]
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
