"""TODO docstring."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.artifacts.guard import ArtifactError, read_safetensors_header
from flexmoe.artifacts.load import load_expert
from flexmoe.core.hashing import fingerprint
from flexmoe.core.surgery import PUBLIC, decoder_layers
from flexmoe.formats.export import _effective_bias, dense_tensors, mlp_prefixes, tokenizer_files, write_checkpoint


def assemble(
    public_model: nn.Module,
    artifacts: list[ExpertArtifact | str | os.PathLike],
    top_k: int | None = None,
    *,
    normalize: bool = False,
    spec_sha256: str | None = None,
) -> nn.Module:
    """Build the merged ``[public, e_1 ... e_n]`` MoE (FlexOlmo step 3), **in place**.

    ``public_model`` is the dense public model (upcycled here) or a flexmoe MoE that has
    only the public expert. Artifacts (objects or paths; a path may hold a LoRA-sized expert,
    materialised by :func:`load_expert`) are validated against it: the fingerprint must match,
    and ``spec_sha256`` too when given.
    """
    from flexmoe.core.hashing import fingerprint
    from flexmoe.core.surgery import add_expert, is_moe, set_top_k, settings, upcycle

    if is_moe(public_model) and settings(public_model).num_experts != 1:
        raise ValueError("assemble() takes the public model (dense, or a MoE with only the public expert)")
    fp = fingerprint(public_model)
    loaded = [
        a if isinstance(a, ExpertArtifact) else load_expert(a, public_model, fingerprint=fp, spec_sha256=spec_sha256)
        for a in artifacts
    ]
    for a in loaded:
        a.validate(public_model, fingerprint=fp, spec_sha256=spec_sha256)
    model = public_model if is_moe(public_model) else upcycle(public_model, num_experts=0, normalize=normalize)
    for a in loaded:
        add_expert(model, a, check_fingerprint=False)
    set_top_k(model, top_k)
    return model


class _ArtifactSource:
    """The dense public model plus owners' artifact files (what :func:`assemble_to_dir` writes).

    Up front, each file's header is checked (size, truncation, fingerprint, spec, owner) and
    only its router rows are read. The full validation (shapes, dtypes, NaN/Inf, fit to the
    public model) happens in :meth:`expert`, which loads one artifact when its shard is written;
    a failure there discards the unfinished export.
    """

    def __init__(self, public: nn.Module, paths, *, top_k, normalize, spec_sha256):
        self.model, self.config = public, public.config
        self.top_k, self.normalize, self.spec_sha256 = top_k, normalize, spec_sha256
        self.paths = [Path(p) for p in paths]
        self.mlp_prefixes = mlp_prefixes(public)
        self.fingerprint = fingerprint(public)
        self.owners = [PUBLIC]
        self._router_rows = []  # per artifact and layer: (embedding, bias) as read up front
        for path in self.paths:
            metadata = read_safetensors_header(path).get("__metadata__") or {}
            owner = metadata.get("owner", path.name)
            stub = ExpertArtifact(owner=owner, tensors={}, metadata=metadata, source=str(path))
            stub.check_identity(fingerprint=self.fingerprint, spec_sha256=spec_sha256)
            if stub.owner in self.owners:
                raise ArtifactError(
                    stub.owner, "owner", "a name not yet in the model", f"a second {stub.owner!r}", source=path
                )
            self.owners.append(stub.owner)
            self._router_rows.append(_read_router_rows(stub, len(self.mlp_prefixes), self.config.hidden_size))
        if top_k is not None and not 1 <= top_k <= len(self.owners):
            raise ValueError(f"top_k must be between 1 and the number of experts ({len(self.owners)}), got {top_k}")
        dtype = next(decoder_layers(public)[0].mlp.parameters()).dtype
        self._routers = []
        for L in range(len(self.mlp_prefixes)):
            rows = [torch.zeros(self.config.hidden_size, dtype=dtype)] + [r[L][0].to(dtype) for r in self._router_rows]
            biases = [torch.zeros(1)] + [r[L][1].float() for r in self._router_rows]
            self._routers.append((torch.stack(rows), torch.cat(biases)))

    def dense_tensors(self):
        return dense_tensors(self.model, self.mlp_prefixes)

    def routers(self):
        return self._routers

    def effective_biases(self) -> list[torch.Tensor]:
        return [_effective_bias(b) for _, b in self._routers]

    router_kind = "clamped"

    def expert(self, j: int) -> list[dict[str, torch.Tensor]]:
        if j == 0:
            return [layer.mlp.state_dict() for layer in decoder_layers(self.model)]
        art = ExpertArtifact.load(self.paths[j - 1], fingerprint=self.fingerprint, spec_sha256=self.spec_sha256)
        art.validate(self.model, fingerprint=self.fingerprint, spec_sha256=self.spec_sha256)
        for L, (emb, bias) in enumerate(self._router_rows[j - 1]):
            _, emb2, bias2 = art.layer(L)
            if not (torch.equal(emb, emb2) and torch.equal(bias, bias2)):
                changed = "different contents (the file changed during assembly)"
                raise ArtifactError(
                    art.owner, f"layers.{L}.router", "the contents read at the start", changed, source=art.source
                )
        return [art.layer(L)[0] for L in range(len(self.mlp_prefixes))]

    def renormalisation_gap(self) -> float | None:
        return None  # would need the whole MoE in memory, which is what this source avoids


def _read_router_rows(artifact: ExpertArtifact, num_layers: int, hidden: int) -> list[tuple[torch.Tensor, ...]]:
    """Just the router embedding [hidden] and bias [1] of every layer, not the expert weights."""
    names = [(f"layers.{L}.router.embedding", f"layers.{L}.router.bias") for L in range(num_layers)]
    try:
        with safe_open(artifact.source, framework="pt") as f:
            present = set(f.keys())
            missing = [n for pair in names for n in pair if n not in present]
            if missing:
                raise ArtifactError(
                    artifact.owner,
                    "router tensors",
                    f"{num_layers} layers of them",
                    f"missing {missing[:4]}",
                    source=artifact.source,
                )
            rows = [(f.get_tensor(e), f.get_tensor(b)) for e, b in names]
    except ArtifactError:
        raise
    except Exception as e:  # safetensors' own errors for unreadable files
        raise ArtifactError(
            artifact.owner, "file", "a readable safetensors file", f"{type(e).__name__}: {e}", source=artifact.source
        ) from e
    for (e, b), (emb, bias) in zip(names, rows):
        if list(emb.shape) != [hidden] or list(bias.shape) != [1]:
            got = f"{e} {list(emb.shape)}, {b} {list(bias.shape)}"
            raise ArtifactError(artifact.owner, "router shapes", f"[{hidden}] and [1]", got, source=artifact.source)
    return rows


def assemble_to_dir(
    public_dir,
    artifact_paths: Sequence[str | os.PathLike],
    out_dir,
    *,
    format: str = "native",
    top_k: int | None = None,
    normalize: bool = False,
    spec_sha256: str | None = None,
    allow_approximate: bool = False,
) -> Path:
    """FlexOlmo step 3 straight to disk: ``[public, e_1 ... e_n]`` without building the MoE.

    Loads the dense public model once, validates every artifact against it (fingerprint, and
    ``spec_sha256`` when given), then writes the public shard and one shard per artifact,
    holding at most one artifact in memory. The result equals
    ``export(assemble(public, artifacts, top_k, normalize=normalize), out_dir, format)``.
    Tokenizer files in ``public_dir`` are copied along.
    """
    public = AutoModelForCausalLM.from_pretrained(public_dir).eval()
    source = _ArtifactSource(public, artifact_paths, top_k=top_k, normalize=normalize, spec_sha256=spec_sha256)
    return write_checkpoint(
        source, out_dir, format, allow_approximate=allow_approximate, files=tokenizer_files(public_dir)
    )
