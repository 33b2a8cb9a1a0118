"""Checkpoints written straight to disk, not through a copy in memory.

Lightning's ``TorchCheckpointIO`` serialises the whole checkpoint into an ``io.BytesIO`` before
writing it (so that a crash never leaves half a file). For an owner at OLMo-2 1B that buffer is
the 9.7 GB checkpoint itself (expert 1 in float32 and AdamW's two moments), held beside the
model while it is saved: measured, it took the run's peak from 16.4 to 23.1 GB (docs/scale.md).
:class:`StreamingCheckpointIO` keeps the same guarantee by writing ``torch.save`` into a temporary
sibling file and renaming it into place (:func:`flexmoe.core.io.atomic_file`), so saving costs
no memory beyond the tensors already held. Loading is Lightning's.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from flexmoe.core.io import atomic_file


class StreamingCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves stream to a temporary file renamed into place;
    a remote path (``s3://...``) is left to Lightning's buffered save.

    >>> trainer = pl.Trainer(plugins=[StreamingCheckpointIO()])

    :class:`~flexmoe.ExpertModule` installs it on its Trainer when the Trainer has Lightning's
    default (:func:`use_streaming_checkpoints`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)


def use_streaming_checkpoints(trainer) -> bool:
    """Give ``trainer``'s strategy a :class:`StreamingCheckpointIO` if it has Lightning's default
    ``TorchCheckpointIO`` (one the user chose, such as ``AsyncCheckpointIO``, is kept); returns
    whether it did."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = StreamingCheckpointIO()
    return True
