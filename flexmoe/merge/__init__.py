"""Merging methods: ensembles and parameter merges of independently trained models.

The methods FlexOlmo is compared with: model soups, task arithmetic, TIES and DARE (one
streaming kernel, :mod:`flexmoe.merge.kernel`, and YAML merge configs), Branch-Train-Merge and
Branch-Train-MiX. A baselines floor, beside :mod:`flexmoe.lora` and independent of it: above
training (BTX fine-tunes with it) and below evaluation, which scores them.
"""

import importlib
import sys
import types

__all__ = ["BTMEnsemble", "MoEFinetune", "btm_average", "btx"]

# Branch-Train-Merge loads its members through transformers, and BTX's MoEFinetune needs Lightning:
# import them on first use only.
_LAZY = {
    "BTMEnsemble": "flexmoe.merge.btm",
    "btm_average": "flexmoe.merge.btm",
    "btx": "flexmoe.merge.btx",
    "MoEFinetune": "flexmoe.merge.btx",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexmoe.merge' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule ``flexmoe.merge.btx`` would bind the *module* to this package's name
    ``btx``, hiding the function of that name; keep the lazy names for the functions and classes
    (as ``dare`` and ``ties`` are the functions, not their modules)."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

# Parameter merges: soups, task arithmetic (and its tangent-space form), TIES, DARE (one kernel,
# flexmoe.merge.kernel), and merge configs.
from flexmoe.merge.config import MergeConfig, MergeConfigError, merge
from flexmoe.merge.dare import dare, dare_dirs
from flexmoe.merge.kernel import MergeMethod, merge_dirs, merge_in_memory
from flexmoe.merge.soup import WeightedSoup, average, average_dirs
from flexmoe.merge.tangent import LinearizedModel, linearize
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
    "MergeConfig",
    "MergeConfigError",
    "LinearizedModel",
    "MergeMethod",
    "TaskVector",
    "WeightedSoup",
    "analogy",
    "average",
    "average_dirs",
    "dare",
    "dare_dirs",
    "disentanglement_error",
    "disentanglement_grid",
    "linearize",
    "merge",
    "merge_dirs",
    "merge_in_memory",
    "plot_disentanglement",
    "task_arithmetic",
    "task_arithmetic_dirs",
    "ties",
    "ties_dirs",
]
