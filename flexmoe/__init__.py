"""flexmoe: FlexOlmo-style federated mixture-of-experts training for PyTorch Lightning.

The names users need most, re-exported from the packages that own them (``core``, ``spec``,
``artifacts``, ``formats``, ``assembly``, ``routing``, ``owner``, ``training``, ``merge``).
This module stands outside the floors: it re-exports from many of them, lazily, so that
``import flexmoe`` stays quick. docs/design.md maps the packages and the path from an owner's
text to an exported model.
"""

import importlib

from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.artifacts.guard import ArtifactError
from flexmoe.core.hashing import fingerprint
from flexmoe.core.moe import MoEBlock, MoESettings, Router, load_balancing_loss, record_router_logits, router_z_loss
from flexmoe.core.surgery import add_expert, is_moe, opt_out, set_top_k, upcycle
from flexmoe.spec import ExpertRecipe, FederationSpec, ProxyBudget, RouterTuningRecipe

__version__ = "0.1.0"

# transformers and Lightning are slow to import; load the modules that need them on first
# use, so that `import flexmoe` (and the merge tools) stay quick.
_LAZY = {
    "assemble": "flexmoe.assembly",
    "export": "flexmoe.formats.export",
    "load": "flexmoe.formats.load",
    "assemble_to_dir": "flexmoe.assembly",
    "merge_experts": "flexmoe.assembly",
    "ExpertModule": "flexmoe.training.expert",
    "expert_callbacks": "flexmoe.training.expert",
    "TextDataModule": "flexmoe.data.datamodule",
    "select_proxy": "flexmoe.owner.proxy",
    "ProxySelection": "flexmoe.owner.proxy",
    "RouterTuning": "flexmoe.training.router_tuning",
    "btx": "flexmoe.merge.btx",
    "MoEFinetune": "flexmoe.merge.btx",
    "BTMEnsemble": "flexmoe.merge.btm",
    "btm_average": "flexmoe.merge.btm",
    "route": "flexmoe.routing",
    "tune_router": "flexmoe.training.router_tuning",
    "use_posterior_routers": "flexmoe.core.posterior",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexmoe' has no attribute {name!r}")


__all__ = [
    "ArtifactError",
    "BTMEnsemble",
    "ExpertArtifact",
    "ExpertModule",
    "ExpertRecipe",
    "FederationSpec",
    "MoEBlock",
    "MoEFinetune",
    "MoESettings",
    "ProxyBudget",
    "ProxySelection",
    "Router",
    "RouterTuning",
    "RouterTuningRecipe",
    "TextDataModule",
    "add_expert",
    "assemble",
    "assemble_to_dir",
    "btm_average",
    "btx",
    "expert_callbacks",
    "export",
    "fingerprint",
    "is_moe",
    "load",
    "load_balancing_loss",
    "merge_experts",
    "opt_out",
    "record_router_logits",
    "route",
    "router_z_loss",
    "select_proxy",
    "set_top_k",
    "tune_router",
    "upcycle",
    "use_posterior_routers",
]
