"""LoraExpertArtifact: an owner's expert sent as LoRA factors, and its materialisation.

An owner with a small upload budget trains its expert as a LoRA on a copy of the public MLP
(:class:`~flexmoe.lora.LoraExpertModule`) and sends only the factors. One safetensors file
(never pickle); tensors, for every decoder layer ``L`` and every adapted linear ``name`` of the
MLP (as named in the base MLP, e.g. ``gate_proj``)::

    layers.{L}.expert.{name}.lora_A   [r, in]    LoRA down-projection A
    layers.{L}.expert.{name}.lora_B   [out, r]   LoRA up-projection B
    layers.{L}.router.embedding       [hidden]   the owner's router row r_j
    layers.{L}.router.bias            [1]        the owner's raw bias beta_j
    layers.{L}.router.public_embedding [hidden]  the public row r_0 it trained against (as in a full artifact)
    layers.{L}.stats.mean, .covariance           routing statistics, when the spec's recipe asks
                                                 (as in a full artifact; float32, ``stats_tokens``)
    stats.unigram                   [vocab_size] the token counts of the training text (as in a full
                                                 artifact; float32, ``unigram_tokens``)
    stats.bigram                    [buckets]    its hashed adjacent-pair counts, when the recipe asks

Metadata (all strings): those of a full :class:`~flexmoe.ExpertArtifact` with
``format_version = "lora-1"`` (so a full-artifact loader refuses the file by name), plus
``lora_rank``, ``lora_scaling`` (the float, as ``repr``) and ``lora_targets`` (comma-separated).

The coordinator calls :meth:`LoraExpertArtifact.materialize` with the public model: every
adapted weight becomes ``W + scaling * B @ A`` (Hu et al., 2021, section 4.1: merged, LoRA adds
no inference cost) and the result is an ordinary :class:`~flexmoe.ExpertArtifact`, so
``flexmoe.assemble``, ``add_expert`` and ``export`` take it unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flexmoe.artifacts.expert import (
    _COUNTS,
    FORMAT_VERSION,
    LAYER_INDEX,
    MAX_WIDTH,
    ExpertArtifact,
    ExpertFile,
    add_token_statistics,
    metadata_count,
)
from flexmoe.artifacts.guard import _DTYPE_NAMES, _DTYPES, ArtifactError
from flexmoe.artifacts.peft_adapters import LoraFactors, lora_factors
from flexmoe.artifacts.unigram import TOKEN_STATISTICS
from flexmoe.core.hashing import content_sha256
from flexmoe.core.hashing import fingerprint as model_fingerprint
from flexmoe.core.surgery import decoder_layers, expert_index, is_moe, moe_blocks

LORA_FORMAT_VERSION = "lora-1"
_LORA_KEY = re.compile(rf"layers\.{LAYER_INDEX}\.(expert\.(.+)\.lora_[AB])")  # fullmatch
# |scaling| bound: peft's alpha / r (default here 2) or rsLoRA's alpha / sqrt(r), with alpha up to
# 4r and r up to 2**16, stays below 2**10. The materialised weights are then held to the expert
# weight scale (flexmoe.artifacts.expert.Plausibility), which is what bounds the expert itself;
# this bound keeps W + scaling * B A from overflowing float32 before that check can run.
MAX_LORA_SCALING = 2.0**10
_RANK = (1, MAX_WIDTH)
_REQUIRED_METADATA = (
    "format_version",
    "owner",
    "fingerprint",
    "spec_sha256",
    "architecture",
    "num_layers",
    "hidden_size",
    "intermediate_size",
    "dtype",
    "training_tokens",
    "lora_rank",
    "lora_scaling",
    "lora_targets",
)


@dataclass
class LoraExpertArtifact(ExpertFile):
    """One owner's expert as LoRA factors of the public MLP, router embedding and bias per layer."""

    # -- metadata accessors (fingerprint, spec_sha256, num_layers, training_tokens: inherited)
    @property
    def rank(self) -> int:
        return metadata_count(self.metadata, "lora_rank", self.owner, self.source, bounds=_RANK)

    @property
    def scaling(self) -> float:
        return _scaling(self.metadata, self.owner, self.source)

    @property
    def targets(self) -> list[str]:
        return self.metadata["lora_targets"].split(",")

    def layer(self, index: int) -> tuple[dict[str, LoraFactors], torch.Tensor, torch.Tensor]:
        """``({linear name: LoraFactors}, router embedding [H], router bias [1])`` of one layer."""
        p = f"layers.{index}."
        factors = {
            t: LoraFactors(self.tensors[f"{p}expert.{t}.lora_A"], self.tensors[f"{p}expert.{t}.lora_B"], self.scaling)
            for t in self.targets
        }
        return factors, self.tensors[f"{p}router.embedding"], self.tensors[f"{p}router.bias"]

    # -- building ---------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        owner: str,
        expert: int | str = 1,
        *,
        spec_sha256: str = "",
        training_tokens: int = 0,
        fingerprint: str | None = None,
        stats=None,
        unigram: torch.Tensor | None = None,
        bigram: torch.Tensor | None = None,
    ) -> LoraExpertArtifact:
        """Extract the LoRA factors of expert ``expert`` of a flexmoe MoE whose expert MLP
        carries peft LoRA layers (as :class:`~flexmoe.lora.LoraExpertModule` trains it).

        ``stats``, ``unigram``, ``bigram``: the owner's routing statistics and token counts, shipped as in a
        full artifact (:meth:`flexmoe.ExpertArtifact.from_model`)."""
        j = expert_index(model, expert)
        if j == 0:
            raise ValueError("expert 0 is the public model, not an owner's expert")
        tensors: dict[str, torch.Tensor] = {}
        ranks, scalings, targets, dtype = set(), set(), None, None
        blocks = moe_blocks(model)
        for L, block in enumerate(blocks):
            factors = lora_factors(block.experts[j])
            if targets is None:
                targets = sorted(factors)
                dtype = factors[targets[0]].A.dtype
            elif sorted(factors) != targets:
                raise ValueError(f"layer {L} adapts {sorted(factors)} but layer 0 adapts {targets}")
            for name, f in factors.items():
                tensors[f"layers.{L}.expert.{name}.lora_A"] = f.A.cpu().contiguous()
                tensors[f"layers.{L}.expert.{name}.lora_B"] = f.B.cpu().contiguous()
                ranks.add(f.rank)
                scalings.add(f.scaling)
            # One dtype in the file: the router row travels in the dtype the LoRA was trained in.
            tensors[f"layers.{L}.router.embedding"] = block.router.weight.detach()[j].to(dtype).cpu().contiguous()
            tensors[f"layers.{L}.router.bias"] = block.router.bias.detach()[j : j + 1].float().cpu().contiguous()
            public_row = block.router.weight.detach()[0].to(dtype).cpu().contiguous()
            tensors[f"layers.{L}.router.public_embedding"] = public_row
            if stats is not None:
                tensors[f"layers.{L}.stats.mean"] = stats.mean[L].float().cpu().contiguous()
                if stats.covariance is not None:
                    tensors[f"layers.{L}.stats.covariance"] = stats.covariance[L].float().cpu().contiguous()
        if len(ranks) != 1 or len(scalings) != 1:
            raise ValueError(f"a LoRA expert has one rank and one scaling; got ranks {ranks}, scalings {scalings}")
        cfg = model.config
        metadata = {
            "format_version": LORA_FORMAT_VERSION,
            "owner": owner,
            "fingerprint": fingerprint or model_fingerprint(model),
            "spec_sha256": spec_sha256,
            "architecture": cfg.model_type,
            "num_layers": str(len(blocks)),
            "hidden_size": str(cfg.hidden_size),
            "intermediate_size": str(cfg.intermediate_size),
            "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
            "training_tokens": str(int(training_tokens)),
            "lora_rank": str(ranks.pop()),
            "lora_scaling": repr(float(scalings.pop())),
            "lora_targets": ",".join(targets),
        }
        if stats is not None:
            metadata["stats_tokens"] = str(int(stats.count))
        add_token_statistics(tensors, metadata, unigram, bigram)
        art = cls(owner=owner, tensors=tensors, metadata=metadata)
        art.check_structure()
        return art

    @staticmethod
    def check_metadata(metadata: dict, owner: str, path: Path) -> None:
        _check_metadata(metadata, owner, path)

    def check_structure(self) -> None:
        """Self-consistency: key layout, layers, targets, the rank in every factor, dtypes, finite
        values. Router rows and routing statistics follow a full artifact's rules and are checked
        by :meth:`flexmoe.ExpertArtifact.check_structure` itself."""
        lora = {k: v for k, v in self.tensors.items() if ".expert." in k}
        shared = {k: v for k, v in self.tensors.items() if k not in lora}
        ExpertArtifact(self.owner, shared, self.metadata, self.source).check_structure()
        n, dtype = self.num_layers, self.metadata["dtype"]  # bounded by the check above
        r = metadata_count(self.metadata, "lora_rank", self.owner, self.source, bounds=_RANK)
        expected = {f"expert.{t}.lora_{ab}" for t in self.targets for ab in "AB"}
        per_layer: dict[int, set[str]] = {L: set() for L in range(n)}
        for name in lora:
            m = _LORA_KEY.fullmatch(name)
            if m is None or int(m.group(1)) not in per_layer:
                raise self._error("tensor names", f"layers.{{0..{n - 1}}}.expert.{{name}}.lora_{{A,B}}", name)
            per_layer[int(m.group(1))].add(m.group(2))
        shapes: dict[str, list[int]] = {}
        for L, names in per_layer.items():
            if names != expected:
                hint = f"missing {sorted(expected - names)}, extra {sorted(names - expected)}"
                raise self._error(f"LoRA tensors of layer {L}", sorted(expected), sorted(names), hint=hint)
            for short in sorted(expected):
                key = f"layers.{L}.{short}"
                got = list(self.tensors[key].shape)
                is_a = short.endswith("lora_A")
                # A [r, in], B [out, r]; in and out are checked against the model in validate().
                if len(got) != 2 or got[0 if is_a else 1] != r:
                    raise self._error(f"shape of {key}", [r, "in"] if is_a else ["out", r], got)
                if got != shapes.setdefault(short, got):
                    raise self._error(f"shape of {key}", f"{shapes[short]} (as in layer 0)", got)
        for name, t in lora.items():
            if _DTYPE_NAMES.get(t.dtype) != dtype:
                raise self._error(f"dtype of {name}", dtype, _DTYPE_NAMES.get(t.dtype, t.dtype))
            if not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise self._error(f"values of {name}", "finite numbers", f"{bad} NaN/Inf entries")

    def validate(self, model: nn.Module, fingerprint: str | None = None, spec_sha256: str | None = None) -> None:
        """Check the LoRA fits ``model`` (the dense public model or a flexmoe MoE built on it):
        layer count, architecture, hidden size, every target a linear layer of the MLP with
        ``A [r, in_features]`` and ``B [out_features, r]``; optionally fingerprint and spec hash."""
        self.check_identity(fingerprint=fingerprint, spec_sha256=spec_sha256)
        mlps = _public_mlps(model)
        if self.num_layers != len(mlps):
            raise self._error("num_layers", len(mlps), self.num_layers)
        if self.metadata.get("architecture") != model.config.model_type:
            raise self._error("architecture", model.config.model_type, self.metadata.get("architecture"))
        if int(self.metadata["hidden_size"]) != model.config.hidden_size:
            raise self._error("hidden_size", model.config.hidden_size, self.metadata["hidden_size"])
        self.check_token_statistics(model.config.vocab_size)
        for L, mlp in enumerate(mlps):
            factors, _, _ = self.layer(L)
            for name, f in factors.items():
                try:
                    linear = mlp.get_submodule(name)
                except AttributeError:
                    linear = None
                if not isinstance(linear, nn.Linear):
                    linears = [n for n, m in mlp.named_modules() if isinstance(m, nn.Linear)]
                    raise self._error(f"lora_targets (layer {L})", f"linear layers of the MLP {linears}", name)
                for what, got, want in (
                    ("lora_A", f.A, [self.rank, linear.in_features]),
                    ("lora_B", f.B, [linear.out_features, self.rank]),
                ):
                    if list(got.shape) != want:
                        raise self._error(f"shape of layers.{L}.expert.{name}.{what}", want, list(got.shape))

    # -- the coordinator's side -------------------------------------------------------
    def materialize(self, public_model: nn.Module, spec_sha256: str | None = None) -> ExpertArtifact:
        """The full :class:`~flexmoe.ExpertArtifact` this LoRA stands for: the public MLP of every
        layer with ``W + scaling * B @ A`` in each adapted linear (computed in float32, stored in
        the public MLP's dtype). The fingerprint must match ``public_model``'s."""
        fp = model_fingerprint(public_model)
        self.validate(public_model, fingerprint=fp, spec_sha256=spec_sha256)
        mlps = _public_mlps(public_model)
        dtype = next(mlps[0].parameters()).dtype
        tensors: dict[str, torch.Tensor] = {}
        for L, mlp in enumerate(mlps):
            factors, embedding, bias = self.layer(L)
            state = {k: v.detach().cpu().clone() for k, v in mlp.state_dict().items()}
            for name, f in factors.items():
                w = state[f"{name}.weight"]
                state[f"{name}.weight"] = (w.float() + f.delta()).to(w.dtype)
            tensors.update({f"layers.{L}.expert.{k}": v.contiguous() for k, v in state.items()})
            tensors[f"layers.{L}.router.embedding"] = embedding.to(dtype).contiguous()
            tensors[f"layers.{L}.router.bias"] = bias.float().contiguous()
            if f"layers.{L}.router.public_embedding" in self.tensors:
                tensors[f"layers.{L}.router.public_embedding"] = (
                    self.tensors[f"layers.{L}.router.public_embedding"].to(dtype).contiguous()
                )
            for part in ("stats.mean", "stats.covariance"):
                if f"layers.{L}.{part}" in self.tensors:
                    tensors[f"layers.{L}.{part}"] = self.tensors[f"layers.{L}.{part}"]
        tensors.update((name, self.tensors[name]) for name in TOKEN_STATISTICS if name in self.tensors)
        metadata = {k: v for k, v in self.metadata.items() if not k.startswith("lora_")}
        metadata.update(
            format_version=FORMAT_VERSION,
            dtype=_DTYPE_NAMES.get(dtype, str(dtype)),
            materialized_from=f"{LORA_FORMAT_VERSION} rank {self.rank} targets {self.metadata['lora_targets']}",
        )
        art = ExpertArtifact(owner=self.owner, tensors=tensors, metadata=metadata, source=self.source)
        art.check_structure()
        # What the owner sent is this LoRA file: the merged model's provenance names its content hash
        # (the one `flexmoe inspect` prints for it), kept beside the object, never read from a file.
        art.sent_content_sha256 = content_sha256(self.tensors, self.metadata)
        return art


def _public_mlps(model: nn.Module) -> list[nn.Module]:
    if is_moe(model):
        return [b.experts[0] for b in moe_blocks(model)]
    return [layer.mlp for layer in decoder_layers(model)]


def _check_metadata(metadata: dict, owner: str, path: Path) -> None:
    version = metadata.get("format_version")
    if version != LORA_FORMAT_VERSION:
        full = version == FORMAT_VERSION
        hint = "this is a full expert artifact; load it with flexmoe.ExpertArtifact.load" if full else ""
        raise ArtifactError(owner, "format_version", LORA_FORMAT_VERSION, version, source=path, hint=hint)
    for key in _REQUIRED_METADATA:
        if key not in metadata:
            raise ArtifactError(owner, f"metadata {key!r}", "present", "missing", source=path)
    for key in _COUNTS:
        if key in _REQUIRED_METADATA or key in metadata:
            metadata_count(metadata, key, owner, path)
    metadata_count(metadata, "lora_rank", owner, path, bounds=_RANK)
    _scaling(metadata, owner, path)
    targets = metadata["lora_targets"].split(",")
    if not all(targets) or len(set(targets)) != len(targets):
        raise ArtifactError(
            owner,
            "metadata 'lora_targets'",
            "comma-separated distinct module names",
            metadata["lora_targets"],
            source=path,
        )
    if metadata["dtype"] not in _DTYPES:
        raise ArtifactError(owner, "metadata 'dtype'", "one of F32, F16, BF16", metadata["dtype"], source=path)


def _scaling(metadata: dict, owner: str, source) -> float:
    """``lora_scaling`` as a float with ``|scaling| <= MAX_LORA_SCALING``, else an :class:`ArtifactError`."""
    text = metadata.get("lora_scaling")
    try:
        scaling = float(text) if isinstance(text, str) and len(text) <= 80 else math.nan
    except ValueError:
        scaling = math.nan
    if not abs(scaling) <= MAX_LORA_SCALING:
        raise ArtifactError(
            owner,
            "metadata 'lora_scaling'",
            f"a number with |scaling| <= {MAX_LORA_SCALING:g} (alpha / rank)",
            text,
            source=source,
        )
    return scaling
