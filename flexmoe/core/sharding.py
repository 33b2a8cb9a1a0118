"""A model sharded with torch's FSDP2 (``fully_shard``), seen from outside its forward pass.

An owner with several devices trains with its model sharded (``ExpertModule.fsdp_strategy``):
every FSDP2 unit holds its parameters as ``DTensor`` shards, one slice of dim 0 per rank, and
gathers them whole only inside its own forward and backward. The callbacks that read the model
between steps (the export, the frozen-weights check, a checkpoint) need the trainable tensors
whole, or the shards as they are; these helpers give both. With no FSDP2 unit in the model every
one of them is a no-op, so callers need no second code path for one device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from flexmoe.core.surgery import decoder_layers


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` made units (``FSDPModule``), outermost first."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support shards nothing
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``model`` or any module inside it."""
    return bool(fsdp_modules(model))


def reshard(model: nn.Module) -> None:
    """Register every unit's sharded parameters again (no communication; frees gathered copies).

    FSDP2 leaves the root unit gathered after a forward pass without a backward one (validation,
    the export's statistics): its parameters then read as whole tensors, not this rank's shards."""
    for unit in fsdp_modules(model):
        unit.reshard()


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` when it is a ``DTensor``, else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def copy_row(t: torch.Tensor, j: int, value: torch.Tensor) -> None:
    """``t[j] = value`` in place, under ``no_grad``, for a plain tensor or a ``DTensor`` (row ``j``
    lives on one rank): the whole tensor is gathered, the row set, and each rank keeps its part
    again (collectives: every rank calls it, with the same ``value``). For the small tensors
    indexed by expert (a router's rows), where gathering costs nothing."""
    with torch.no_grad():
        if not hasattr(t, "full_tensor"):
            t[j].copy_(value.to(t.device, t.dtype))
            return
        from torch.distributed.tensor import distribute_tensor

        whole = t.full_tensor()
        whole[j].copy_(value.to(whole.device, whole.dtype))
        t.copy_(distribute_tensor(whole, t.device_mesh, t.placements))


@contextlib.contextmanager
def gathered_layers(model: nn.Module, *, keep: bool = True) -> Iterator[None]:
    """Within the block, the trainable parameters of ``model``'s decoder layers (expert 1 and the
    router, or a LoRA expert's factors: exactly what ``fsdp_units`` leaves in the layers' own
    units) are whole tensors on the CPU, read-only; the frozen ones stay shards.

    Each is gathered with ``DTensor.full_tensor()``, an all-gather, one tensor at a time (so a
    device holds one whole tensor at a time), in the same order on every rank: every rank must
    enter. With ``keep=False`` this rank takes part but keeps nothing (its parameters stay
    shards; only the ranks that keep may read them). On exit the shards are put back.

    The whole tensors are set on the modules behind FSDP2's back (its units stay in their
    sharded state), not by ``FSDPModule.unshard()``: FSDP2 reshards a unit whenever
    ``state_dict()`` is called on a module holding its parameters, which an artifact's
    extraction does. Parameters already whole (a block nested in another) are left alone, so
    ``ExportExpert`` gathers on every rank and ``ExpertModule.artifact`` on rank 0 gathers
    nothing more."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.tensor import DTensor

    swapped = []
    try:
        for layer in decoder_layers(model):
            for module in layer.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    if p.requires_grad and isinstance(p, DTensor):
                        whole = p.detach().full_tensor().cpu()
                        if keep:
                            swapped.append((module, name, p))
                            module._parameters[name] = nn.Parameter(whole, requires_grad=True)
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p
