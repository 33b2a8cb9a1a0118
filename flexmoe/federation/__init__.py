"""The Flower federation: one ``ClientApp`` per data owner, one ``ServerApp`` coordinator.
Run it with ``flwr run examples/federation``; see docs/federation.md.

The federation floor sits above training, evaluation and the baselines, which it drives, and
below the experiments and the CLI; no floor below it imports Flower.

    flexmoe.federation.client_app:app   the owner (trains its expert, replies with it)
    flexmoe.federation.server_app:app   the coordinator (collects, validates, merges, reports)
    flexmoe.federation.task             the owner's work with no Flower in it (training, router rounds)

Importing this package loads neither app (nor Flower's simulation engine, nor torch-heavy
modules); the names below are loaded on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Coordinator": "flexmoe.federation.coordinator",
    "CoordinatorSettings": "flexmoe.federation.settings",
    "OwnerSettings": "flexmoe.federation.settings",
    "train_owner_expert": "flexmoe.federation.task",
    "write_report": "flexmoe.federation.report",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexmoe.federation' has no attribute {name!r}")


__all__ = ["Coordinator", "CoordinatorSettings", "OwnerSettings", "train_owner_expert", "write_report"]
