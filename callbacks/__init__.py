"""Lightning callbacks for flexmoe, imported as ``flexmoe.callbacks``.

Each is one concern, usable on its own in any ``Trainer`` whose LightningModule holds a
flexmoe MoE (as ``.model`` or anywhere inside it), and saves its state in checkpoints.
"""

from .export import ExportExpert
from .freeze import FreezePublicModel, PublicModelChanged
from .router_init import RouterEmbeddingInit
from .router_stats import RouterStats

__all__ = ["ExportExpert", "FreezePublicModel", "PublicModelChanged", "RouterEmbeddingInit", "RouterStats"]
