"""flexmoe: FlexOlmo-style federated mixture-of-experts training for PyTorch Lightning."""

from flexmoe.artifact import ArtifactError, ExpertArtifact, assemble
from flexmoe.hf import assemble_to_dir, export, load
from flexmoe.moe import MoEBlock, MoESettings, Router, load_balancing_loss, record_router_logits, router_z_loss
from flexmoe.upcycle import add_expert, fingerprint, is_moe, opt_out, set_top_k, upcycle

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "ExpertArtifact",
    "MoEBlock",
    "MoESettings",
    "Router",
    "add_expert",
    "assemble",
    "assemble_to_dir",
    "export",
    "fingerprint",
    "is_moe",
    "load",
    "load_balancing_loss",
    "opt_out",
    "record_router_logits",
    "router_z_loss",
    "set_top_k",
    "upcycle",
]
