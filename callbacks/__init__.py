"""Lightning callbacks for flexmoe, imported as ``flexmoe.callbacks``.

The callbacks floor, above the owner side (``flexmoe.owner``, ``flexmoe.routing``) and below
``flexmoe.training``, whose ``expert_callbacks`` attaches them: freezing and verifying the public
model, initialising the owner's router row, writing the artifact, logging routing.

Each is one concern, usable on its own in any ``Trainer`` whose LightningModule holds a
flexmoe MoE (as ``.model`` or anywhere inside it), and saves its state in checkpoints.
"""

from .export import ExportExpert
from .freeze import FreezePublicModel, PublicModelChanged
from .router_init import RouterEmbeddingInit
from .router_stats import RouterStats

__all__ = ["ExportExpert", "FreezePublicModel", "PublicModelChanged", "RouterEmbeddingInit", "RouterStats"]
