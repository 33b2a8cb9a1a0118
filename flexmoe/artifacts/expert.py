"""ExpertArtifact: what an owner sends to the coordinator, and its validation.

One safetensors file (never pickle). Tensors, for every decoder layer ``L``::

    layers.{L}.expert.{name}              the expert MLP's parameters, named as in the base MLP
    layers.{L}.router.embedding           [hidden]  the owner's router row r_j
    layers.{L}.router.bias                [1]       the owner's raw bias beta_j (used as min(beta_j, 0))
    layers.{L}.router.public_embedding    [hidden]  the public expert's row r_0 the owner trained
                                                    against (frozen: the spec's r_pub, or zeros)

``r_j`` and ``beta_j`` only mean something next to the ``r_0`` they were trained against, so the
merge takes ``r_0`` from the artifacts (:func:`flexmoe.assemble` checks that they agree). Files
written before artifacts carried ``router.public_embedding`` still load; the merge then takes
their ``r_0`` from the spec it is given, or zeros without one.

and, when the spec's routing recipe asks for them (``spec.routing``; docs/routing.md), the
aggregate statistics of the MLP inputs in the owner's own 2-expert model on its own data,
float32, with their token count in the metadata ``stats_tokens``::

    layers.{L}.stats.mean         [hidden]          mean MLP input
    layers.{L}.stats.covariance   [hidden, hidden]  its covariance (recipe "pooled")

and the token unigram counts of the owner's training text over the public tokenizer's vocabulary,
one vector for the whole model, with their total in the metadata ``unigram_tokens``
(:mod:`flexmoe.artifacts.unigram`)::

    stats.unigram                 [vocab_size]      float32, integral counts
    stats.bigram                  [buckets]         float32, hashed adjacent-pair counts (with the
                                                    posterior recipe's bigrams; total ``bigram_pairs``)

Metadata (all strings): format version, base fingerprint, spec sha256, architecture,
layer count, hidden and intermediate sizes, dtype, owner name, training tokens.

The file comes from another party, so :meth:`ExpertArtifact.load` checks the raw bytes
before safetensors sees them (within :class:`~flexmoe.artifacts.guard.HeaderBounds` when given),
every count in the metadata is an ASCII decimal within a bound before anything is sized by it,
and :meth:`ExpertArtifact.validate` also checks that the values are plausible next to the
public model (:class:`Plausibility`: router rows, biases, expert weight scales, statistics; the
margins and the measurements behind them are in docs/trust.md). Every problem raises
:class:`ArtifactError` naming the owner, the field, and what was expected and found.
"""

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from flexmoe.artifacts.guard import (
    _DTYPE_NAMES,
    _DTYPES,
    DEFAULT_MAX_BYTES,
    ArtifactError,
    HeaderBounds,
    read_safetensors_header,
)
from flexmoe.artifacts.unigram import (
    BIGRAM_TENSOR,
    TOKEN_STATISTICS,
    UNIGRAM_TENSOR,
    TokenStatistics,
    statistics_problem,
    statistics_tensors,
)
from flexmoe.core.errors import InputError
from flexmoe.core.hashing import fingerprint as model_fingerprint
from flexmoe.core.io import atomic_file
from flexmoe.core.parsing import parse_count
from flexmoe.core.surgery import decoder_layers, expert_index, is_moe, moe_blocks
from flexmoe.spec import PRIVACY_ACCOUNTANTS

FORMAT_VERSION = "1"
# Used with fullmatch; the layer index in ASCII digits without leading zeros, so that each layer
# has one spelling (``layers.03`` would be read as layer 3 and then looked up as ``layers.3``).
LAYER_INDEX = r"(0|[1-9][0-9]{0,8})"
# What ExpertArtifact.open leaves unread until read_tensors: the tensors that grow with the model.
_STREAMED = re.compile(rf"layers\.{LAYER_INDEX}\.(expert\..+|stats\.covariance)")
_KEY = re.compile(
    rf"layers\.{LAYER_INDEX}\.(expert\.(.+)|router\.embedding|router\.bias|router\.public_embedding"
    r"|stats\.mean|stats\.covariance)"
)
# Bounds on the counts the metadata declares, checked before anything is sized by them: more
# layers than any released decoder (OLMo-2 32B has 64), wider than any (2**20 is 16x Llama 3.1
# 405B's intermediate size); token totals exact in float64 (2**53 is 9e15, ~600x the largest
# published pretraining corpus), so no count overflows a tensor product or a float conversion.
MAX_LAYERS = 4096
MAX_WIDTH = 2**20
MAX_TOKENS = 2**53
_COUNTS = {
    "num_layers": (1, MAX_LAYERS),
    "hidden_size": (1, MAX_WIDTH),
    "intermediate_size": (1, MAX_WIDTH),
    "training_tokens": (0, MAX_TOKENS),
    "stats_tokens": (0, MAX_TOKENS),
    "unigram_tokens": (0, MAX_TOKENS),
    "bigram_pairs": (0, MAX_TOKENS),
}

# Differential privacy (flexmoe.spec.PrivacyRecipe, docs/privacy.md): what an owner's file records
# when its privacy recipe was on. ``dp_epsilon`` at ``dp_delta`` covers what ``dp_covers`` lists
# (``expert``: MLP, router row and bias by DP-SGD; ``stats.unigram``, ``stats.bigram``: the token
# counts by the Gaussian mechanism), composed by ``dp_accountant``; anything else in the file was
# computed exactly. Each float field: (low, high), open at 0 where a 0 would mean no noise.
PRIVACY_COVERS = ("expert", UNIGRAM_TENSOR, BIGRAM_TENSOR)
_PRIVACY_FLOATS = {
    "dp_epsilon": (0.0, 1e6),
    "dp_delta": (0.0, 1.0),
    "dp_expert_epsilon": (0.0, 1e6),
    "dp_noise_multiplier": (0.0, 1e6),
    "dp_max_grad_norm": (0.0, 1e6),
    "dp_sample_rate": (0.0, 1.0),
    "dp_statistics_epsilon": (0.0, 1e6),
    "dp_statistics_noise_multiplier": (0.0, 1e6),
    "dp_statistics_clip": (0.0, 1e6),
}
_PRIVACY_REQUIRED = {
    None: ("dp_epsilon", "dp_delta", "dp_accountant", "dp_covers"),
    "expert": ("dp_expert_epsilon", "dp_noise_multiplier", "dp_max_grad_norm", "dp_sample_rate", "dp_steps"),
    UNIGRAM_TENSOR: ("dp_statistics_epsilon", "dp_statistics_noise_multiplier", "dp_statistics_clip"),
}
PRIVACY_METADATA = (*_PRIVACY_FLOATS, "dp_accountant", "dp_covers", "dp_steps")


@dataclass(frozen=True)
class Plausibility:
    """How far an accepted expert's values may sit from the public model's: the bounds
    :meth:`ExpertArtifact.validate` checks (and, for the MLP-input statistics, which need the
    public data's, :func:`flexmoe.routing.route`). Each sits 24-670x above the largest value honest
    experts measured (docs/trust.md: the command and the numbers), so an honest owner never meets
    it, while every value inside keeps the merged model's logits finite
    (tests/artifacts/test_plausibility.py). They bound magnitudes, not intent: which tokens an
    owner can take is set by the routing recipe (docs/trust.md states it for each).

    * ``router_row``: every router row the file carries (``r_j`` and the public ``r_0``) has an
      L2 norm of at most ``router_row * sqrt(max(1, hidden / 128))``. Rows start at unit norm
      (:mod:`flexmoe.owner.embed`) and Adam moves each coordinate by about the learning rate per
      step, so drift grows like ``sqrt(hidden)``; honest rows measured at most 1.12 at hidden 128.
    * ``router_bias``: ``|beta_j| <= router_bias``. A logit offset of 16 is odds of 9e6 to 1:
      an expert biased further is switched off, which needs no bigger number.
    * ``weight_scale``: each expert tensor's RMS and largest entry at most ``weight_scale`` times
      the public MLP tensor's (the tensor's own, or the layer's MLP RMS where the public tensor
      is zero, as a bias may be). An owner's expert starts as a copy of the public MLP.
    * ``statistics``: an owner's per-layer mean MLP input within ``statistics`` public standard
      deviations (``sqrt(tr Sigma_pub)``) of the public mean, and the trace of its covariance at
      most ``statistics**2`` times the public one (checked by :func:`flexmoe.routing.route`).
    * ``covariance_tolerance``: a shipped covariance is positive semi-definite up to this share of
      its mean eigenvalue (float32 rounding of an honest one), checked by a Cholesky factorisation.
    """

    router_row: float = 64.0
    router_bias: float = 16.0
    weight_scale: float = 32.0
    statistics: float = 16.0
    covariance_tolerance: float = 1e-3

    def router_row_bound(self, hidden: int) -> float:
        return self.router_row * math.sqrt(max(1.0, hidden / 128))


# Tensors kept in float32 whatever the expert's dtype.
_FLOAT32_KEYS = ("router.bias", "stats.mean", "stats.covariance")
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
)


@dataclass
class ExpertFile(ABC):
    """What every expert file has in common, full (:class:`ExpertArtifact`) or LoRA-sized
    (:class:`flexmoe.lora.LoraExpertArtifact`): typed metadata, an atomic save, a load that
    checks the raw bytes before safetensors sees them, and the identity check. A subclass is a
    dataclass (the fields ``owner``, ``tensors``, ``metadata``, ``source`` are inherited) and supplies
    ``check_metadata`` (run on the header before any tensor is read) and ``check_structure``."""

    owner: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str | None = None

    @property
    def fingerprint(self) -> str:
        return self.metadata["fingerprint"]

    @property
    def spec_sha256(self) -> str:
        return self.metadata["spec_sha256"]

    @property
    def num_layers(self) -> int:
        return int(self.metadata["num_layers"])

    @property
    def training_tokens(self) -> int:
        return int(self.metadata["training_tokens"])

    @property
    def public_router_rows(self) -> torch.Tensor | None:
        """``r_0`` of every layer ``[L, H]`` as the owner trained against it, or ``None`` for a
        file written before artifacts carried it."""
        if "layers.0.router.public_embedding" not in self.tensors:
            return None
        return torch.stack([self.tensors[f"layers.{L}.router.public_embedding"] for L in range(self.num_layers)])

    @property
    def unigram(self) -> torch.Tensor | None:
        """The token unigram counts of the owner's training text ``float32 [vocab_size]``, or
        ``None`` for a file that carries none (:func:`flexmoe.artifacts.unigram.require_unigram`
        says what to do)."""
        return self.tensors.get(UNIGRAM_TENSOR)

    @property
    def privacy(self) -> dict[str, object] | None:
        """What the owner's differential privacy recorded (``dp_epsilon``, ``dp_delta``,
        ``dp_covers`` as a list, ... parsed; :data:`PRIVACY_METADATA`), or ``None`` for a file
        trained and released without it."""
        return privacy_fields(self.metadata, self.owner, self.source)

    def privacy_summary(self) -> str:
        """One line for the coordinator's report: the epsilon, what it covers, and what the file
        carries outside it (exact)."""
        dp = self.privacy
        if dp is None:
            return "no differential privacy"
        covered = set(dp["dp_covers"])
        exact = [] if "expert" in covered else ["expert"]
        exact += [name for name in TOKEN_STATISTICS if name in self.tensors and name not in covered]
        if "layers.0.stats.mean" in self.tensors:
            exact.append("MLP-input moments")
        line = (
            f"DP epsilon {dp['dp_epsilon']:.3g} at delta {dp['dp_delta']:.3g} ({dp['dp_accountant']}) "
            f"over {', '.join(dp['dp_covers'])}"
        )
        return line + (f"; exact: {', '.join(exact)}" if exact else "")

    @property
    def bigram(self) -> torch.Tensor | None:
        """The hashed adjacent-pair counts of the owner's training text ``float32 [buckets]``, or
        ``None`` for a file that carries none."""
        return self.tensors.get(BIGRAM_TENSOR)

    def check_token_statistics(self, vocab_size: int | None = None, buckets: int | None = None) -> None:
        """The token counts, when present, keep
        :func:`~flexmoe.artifacts.unigram.statistics_problem`'s rules (with ``vocab_size``: the
        public model's; ``buckets``: the recipe's); each total comes only with its counts."""
        problem = statistics_problem(self.tensors, self.metadata, vocab_size, buckets)
        if problem is not None:
            raise self._error(*problem)

    # -- I/O --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (atomically: a crash never leaves half a file)."""
        path = Path(path)
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp), metadata=dict(self.metadata))
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        fingerprint: str | None = None,
        spec_sha256: str | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        bounds: HeaderBounds | None = None,
    ):
        """Read and validate an expert file. Raises :class:`ArtifactError` on any problem.

        ``bounds``: what the public model implies the file may hold
        (:meth:`HeaderBounds.for_expert`); with them, a file declaring more is refused from its
        header, before any tensor is read. Every coordinator-side caller passes them."""
        path = Path(path)
        header, metadata, owner = cls._checked_header(path, max_bytes, bounds)
        tensors = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    tensors[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise _unreadable(owner, path, e) from e
        art = cls(owner=metadata["owner"], tensors=tensors, metadata=dict(metadata), source=str(path))
        art.check_structure()
        art.check_identity(fingerprint=fingerprint, spec_sha256=spec_sha256)
        return art

    @classmethod
    def _checked_header(cls, path: Path, max_bytes: int, bounds: HeaderBounds | None) -> tuple[dict, dict, str]:
        """``(tensor entries, metadata, owner)`` of the file's header, checked before any tensor is
        read: the guard's checks, the metadata's (:meth:`check_metadata`, the privacy fields) and
        every dtype one of F32, F16, BF16."""
        header = read_safetensors_header(path, max_bytes=max_bytes, bounds=bounds)
        metadata = header.pop("__metadata__", None) or {}
        owner = metadata.get("owner") if isinstance(metadata.get("owner"), str) else path.name
        cls.check_metadata(metadata, owner, path)
        privacy_fields(metadata, owner, path)
        for name, entry in header.items():
            if entry["dtype"] not in _DTYPES:
                raise ArtifactError(
                    owner, f"dtype of tensor {name}", "one of F32, F16, BF16", entry["dtype"], source=path
                )
        return header, metadata, owner

    @staticmethod
    @abstractmethod
    def check_metadata(metadata: dict, owner: str, path: Path) -> None:
        """Check the header's metadata (before any tensor is read); raise :class:`ArtifactError`."""

    @abstractmethod
    def check_structure(self) -> None:
        """Check the tensors' layout, shapes, dtypes and values; raise :class:`ArtifactError`."""

    # -- validation -------------------------------------------------------------------
    def _error(self, field, expected, got, hint=""):
        return ArtifactError(self.owner, field, expected, got, source=self.source, hint=hint)

    def _count(self, key: str) -> int:
        """Metadata count ``key`` as an ``int`` within its bound (:data:`_COUNTS`)."""
        return metadata_count(self.metadata, key, self.owner, self.source)

    def check_identity(self, fingerprint: str | None = None, spec_sha256: str | None = None) -> None:
        """Check the expert was trained on this public model and under this spec."""
        if fingerprint is not None and self.metadata.get("fingerprint") != fingerprint:
            raise self._error(
                "fingerprint",
                fingerprint,
                self.metadata.get("fingerprint"),
                hint="the expert was trained on a different public model",
            )
        if spec_sha256 is not None and self.metadata.get("spec_sha256") != spec_sha256:
            raise self._error(
                "spec_sha256",
                spec_sha256,
                self.metadata.get("spec_sha256"),
                hint="the expert was trained under a different FederationSpec",
            )


@dataclass
class ExpertArtifact(ExpertFile):
    """One owner's expert: MLP weights, router embedding and bias for every layer."""

    @property
    def routing_stats(self):
        """The owner's MLP-input statistics (:class:`flexmoe.artifacts.expert.MLPInputStats`: ``mean``
        ``[L, H]``, ``covariance`` ``[L, H, H]`` or ``None``), or ``None`` if it shipped none."""
        if "layers.0.stats.mean" not in self.tensors:
            return None
        n = self.num_layers
        mean = torch.stack([self.tensors[f"layers.{L}.stats.mean"] for L in range(n)]).double()
        cov = None
        if "layers.0.stats.covariance" in self.tensors:
            cov = torch.stack([self.tensors[f"layers.{L}.stats.covariance"] for L in range(n)]).double()
        count = self._count("stats_tokens") if "stats_tokens" in self.metadata else 0
        return MLPInputStats(mean=mean, count=count, covariance=cov)

    def layer(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """``(expert state dict, router embedding [H], router bias [1])`` of one layer."""
        prefix = f"layers.{index}.expert."
        state = {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return state, self.tensors[f"layers.{index}.router.embedding"], self.tensors[f"layers.{index}.router.bias"]

    # -- streaming: one large tensor at a time ------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        fingerprint: str | None = None,
        spec_sha256: str | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        bounds: HeaderBounds | None = None,
    ):
        """:meth:`load` without reading the large tensors: what the coordinator uses to stream an
        artifact, so that it never holds a whole one (docs/scale.md).

        The header gets every check :meth:`load` makes, and the small tensors (router rows and
        biases, MLP-input means, token counts) are read and checked. Each tensor that grows with
        the model (:meth:`held` says which do not) stays a ``meta`` tensor of its declared shape
        and dtype, so :meth:`check_structure` and :meth:`validate` check its name, shape and dtype
        now; :meth:`read_tensors` reads it and checks its values, by the same rules."""
        path = Path(path)
        header, metadata, owner = cls._checked_header(path, max_bytes, bounds)
        tensors = {}
        try:
            with safe_open(str(path), framework="pt", backend="pread") as f:
                for name in sorted(header):
                    entry = header[name]
                    if cls.held(name):
                        tensors[name] = f.get_tensor(name)
                    else:
                        tensors[name] = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]], device="meta")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise _unreadable(owner, path, e) from e
        art = cls(owner=metadata["owner"], tensors=tensors, metadata=dict(metadata), source=str(path))
        art.check_structure()
        art.check_identity(fingerprint=fingerprint, spec_sha256=spec_sha256)
        return art

    @staticmethod
    def held(name: str) -> bool:
        """Whether :meth:`open` reads tensor ``name`` at once: everything but the MLP weights and
        the covariances, whose size grows with the model rather than with its width."""
        return _STREAMED.fullmatch(name) is None

    def read_tensors(
        self, model: nn.Module | None = None, *, plausibility: Plausibility | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor ``(name, tensor)`` by sorted name, one at a time: those :meth:`open` left
        unread are read now (never more than one at once), checked to be what the header declared
        and checked for their values (:meth:`check_values`; with ``model``, the public model the
        artifact was validated against, also for plausibility next to it, as
        :meth:`check_plausible` does). An :class:`ArtifactError` stops the iteration at the first
        problem, so a caller that writes what it is given must discard what it wrote."""
        mlps = _public_mlps(model) if model is not None else None
        bounds = plausibility or Plausibility()
        reference: tuple[int, dict] | None = None
        try:
            handle = safe_open(str(self.source), framework="pt", backend="pread")
        except Exception as e:  # the file went away or became unreadable since open()
            raise _unreadable(self.owner, self.source, e) from e
        with handle as f:
            for name in sorted(self.tensors):
                declared = self.tensors[name]
                if not declared.is_meta:
                    yield name, declared
                    continue
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise _unreadable(self.owner, self.source, e) from e
                if t.dtype != declared.dtype or t.shape != declared.shape:
                    got = f"{_DTYPE_NAMES.get(t.dtype, t.dtype)} {list(t.shape)} (the file changed after it was opened)"
                    want = f"{_DTYPE_NAMES.get(declared.dtype)} {list(declared.shape)}"
                    raise self._error(f"tensor {name}", want, got)
                self.check_values(name, t)
                if mlps is not None:
                    m = _KEY.fullmatch(name)
                    L = int(m.group(1))
                    if m.group(3) is not None:
                        if reference is None or reference[0] != L:
                            reference = (L, _scale_reference(mlps[L]))
                        self._check_scale(L, m.group(3), t, reference[1], bounds)
                    elif name.endswith("stats.covariance"):
                        self._check_covariance(name, t, bounds)
                yield name, t
                del t

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
    ) -> ExpertArtifact:
        """Extract expert ``expert`` (index or owner name) of a flexmoe MoE as ``owner``'s artifact.

        ``stats``: the owner's :class:`flexmoe.artifacts.expert.MLPInputStats` for the routing recipe
        (:func:`flexmoe.routing.owner_statistics`), shipped as ``layers.{L}.stats.*``.
        ``unigram``: the token counts of its training text
        (:func:`flexmoe.data.statistics.unigram_counts`), shipped as ``stats.unigram``; ``bigram``
        its hashed pair counts (:func:`flexmoe.data.statistics.bigram_counts`), ``stats.bigram``.
        """
        j = expert_index(model, expert)
        if j == 0:
            raise ValueError("expert 0 is the public model, not an owner's expert")
        blocks = moe_blocks(model)
        tensors: dict[str, torch.Tensor] = {}
        for L, block in enumerate(blocks):
            for name, t in block.experts[j].state_dict().items():
                tensors[f"layers.{L}.expert.{name}"] = t.detach().cpu().contiguous()
            tensors[f"layers.{L}.router.embedding"] = block.router.weight.detach()[j].cpu().contiguous()
            tensors[f"layers.{L}.router.bias"] = block.router.bias.detach()[j : j + 1].float().cpu().contiguous()
            tensors[f"layers.{L}.router.public_embedding"] = block.router.weight.detach()[0].cpu().contiguous()
            if stats is not None:
                tensors[f"layers.{L}.stats.mean"] = stats.mean[L].float().cpu().contiguous()
                if stats.covariance is not None:
                    tensors[f"layers.{L}.stats.covariance"] = stats.covariance[L].float().cpu().contiguous()
        cfg = model.config
        dtype = next(blocks[0].experts[j].parameters()).dtype
        metadata = {
            "format_version": FORMAT_VERSION,
            "owner": owner,
            "fingerprint": fingerprint or model_fingerprint(model),
            "spec_sha256": spec_sha256,
            "architecture": cfg.model_type,
            "num_layers": str(len(blocks)),
            "hidden_size": str(cfg.hidden_size),
            "intermediate_size": str(cfg.intermediate_size),
            "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
            "training_tokens": str(int(training_tokens)),
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
        """Self-consistency: key layout, layer set, shapes vs metadata, dtypes, finite values."""
        # Bounded before range(n) is built from it: a declared 10**11 layers is refused here.
        n, hidden = self._count("num_layers"), self._count("hidden_size")
        dtype = self.metadata.get("dtype")
        for key in ("unigram_tokens", "bigram_pairs"):
            if key in self.metadata:
                self._count(key)
        self.check_token_statistics()
        per_layer: dict[int, set[str]] = {}
        for name in self.tensors:
            if name in TOKEN_STATISTICS:
                continue
            m = _KEY.fullmatch(name)
            if m is None:
                raise self._error(
                    "tensor names",
                    "layers.{L}.expert.*, layers.{L}.router.{embedding,bias,public_embedding}, layers.{L}.stats.* "
                    f"or {', '.join(TOKEN_STATISTICS)}",
                    name,
                )
            per_layer.setdefault(int(m.group(1)), set()).add(m.group(2))
        if set(per_layer) != set(range(n)):
            missing = sorted(set(range(n)) - set(per_layer))
            extra = sorted(set(per_layer) - set(range(n)))
            raise self._error("layers", f"0..{n - 1}", f"missing {missing}, extra {extra}")
        reference = per_layer[0]
        for L in range(n):
            names = per_layer[L]
            for required in ("router.embedding", "router.bias"):
                if required not in names:
                    raise self._error(f"layers.{L}.{required}", "present", "missing")
            if names != reference:
                raise self._error(f"tensors of layer {L}", sorted(reference), sorted(names))
            if "stats.covariance" in names and "stats.mean" not in names:
                raise self._error(f"layers.{L}.stats.mean", "present with stats.covariance", "missing")
            shapes = {
                "router.embedding": [hidden],
                "router.bias": [1],
                "router.public_embedding": [hidden],
                "stats.mean": [hidden],
                "stats.covariance": [hidden, hidden],
            }
            for part, expected in shapes.items():
                key = f"layers.{L}.{part}"
                if key in self.tensors and list(self.tensors[key].shape) != expected:
                    raise self._error(f"shape of {key}", expected, list(self.tensors[key].shape))
        if "stats.mean" in reference:
            if "stats_tokens" not in self.metadata:
                raise self._error("metadata 'stats_tokens'", "present with layers.*.stats.*", "missing")
            self._count("stats_tokens")
        for name, t in self.tensors.items():
            if name in TOKEN_STATISTICS:
                continue  # checked above
            if not t.is_floating_point():
                raise self._error(f"dtype of {name}", "a floating-point dtype", t.dtype)
            if name.endswith(_FLOAT32_KEYS):
                if name.split(".", 2)[2] != "router.bias" and t.dtype != torch.float32:
                    raise self._error(f"dtype of {name}", "F32", _DTYPE_NAMES.get(t.dtype, t.dtype))
            elif _DTYPE_NAMES.get(t.dtype) != dtype:
                raise self._error(f"dtype of {name}", dtype, _DTYPE_NAMES.get(t.dtype, t.dtype))
        for name, t in self.tensors.items():
            if name not in TOKEN_STATISTICS and not t.is_meta:  # a tensor open() left unread: read_tensors
                self.check_values(name, t)

    def check_values(self, name: str, t: torch.Tensor) -> None:
        """Tensor ``name``'s values, whatever the public model: finite, and a covariance symmetric
        with a non-negative diagonal (part of :meth:`check_structure`, one tensor at a time)."""
        if not _finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise self._error(f"values of {name}", "finite numbers", f"{bad} NaN/Inf entries")
        if name.endswith("stats.covariance"):
            asym = float((t - t.T).abs().max())
            if asym > 1e-3 * max(1.0, float(t.abs().max())) or bool((t.diagonal() < 0).any()):
                raise self._error(
                    f"values of {name}",
                    "a covariance (symmetric, non-negative diagonal)",
                    f"asymmetry {asym:.3g}, min diagonal {float(t.diagonal().min()):.3g}",
                )

    def validate(
        self,
        model: nn.Module,
        fingerprint: str | None = None,
        spec_sha256: str | None = None,
        *,
        plausibility: Plausibility | None = None,
    ) -> None:
        """Check the artifact fits ``model`` (dense public model or flexmoe MoE built on it):
        layer count, expert tensor names, shapes and dtypes, hidden size, optionally the
        fingerprint and spec hash, and that its values are plausible next to the public model
        (``plausibility``, default :class:`Plausibility`)."""
        self.check_identity(fingerprint=fingerprint, spec_sha256=spec_sha256)
        mlps = _public_mlps(model)
        if self._count("num_layers") != len(mlps):
            raise self._error("num_layers", len(mlps), self.num_layers)
        if self.metadata.get("architecture") != model.config.model_type:
            raise self._error("architecture", model.config.model_type, self.metadata.get("architecture"))
        hidden = model.config.hidden_size
        if self._count("hidden_size") != hidden:
            raise self._error("hidden_size", hidden, self.metadata["hidden_size"])
        self.check_token_statistics(model.config.vocab_size)
        for L, mlp in enumerate(mlps):
            state, _, _ = self.layer(L)
            want = mlp.state_dict()
            if set(state) != set(want):
                raise self._error(
                    f"expert tensors of layer {L}",
                    sorted(want),
                    sorted(state),
                    hint=f"missing {sorted(set(want) - set(state))}, extra {sorted(set(state) - set(want))}",
                )
            for name, ref in want.items():
                got = state[name]
                if got.shape != ref.shape:
                    raise self._error(f"shape of layers.{L}.expert.{name}", list(ref.shape), list(got.shape))
                if got.dtype != ref.dtype:
                    raise self._error(f"dtype of layers.{L}.expert.{name}", ref.dtype, got.dtype)
        self.check_plausible(mlps, hidden, plausibility or Plausibility())

    def check_plausible(self, mlps: list[nn.Module], hidden: int, bounds: Plausibility) -> None:
        """The values are plausible next to the public MLPs ``mlps`` (one per layer) of width
        ``hidden``: router rows and biases, expert weight scales, and a positive semi-definite
        covariance (:class:`Plausibility`). Shapes were checked by :meth:`validate`. A tensor
        :meth:`open` left unread is checked when :meth:`read_tensors` reads it."""
        row_bound = bounds.router_row_bound(hidden)
        for L, mlp in enumerate(mlps):
            state, _, bias = self.layer(L)
            for part in ("router.embedding", "router.public_embedding"):
                key = f"layers.{L}.{part}"
                if key in self.tensors:
                    norm = float(torch.linalg.vector_norm(self.tensors[key].double()))
                    if not norm <= row_bound:
                        raise self._error(
                            f"norm of {key}", f"at most {row_bound:.4g} (router rows start at norm 1)", f"{norm:.4g}"
                        )
            b = float(bias.double().abs().max())
            if not b <= bounds.router_bias:
                raise self._error(f"values of layers.{L}.router.bias", f"|beta| <= {bounds.router_bias:g}", f"{b:.4g}")
            reference = None
            for name, got in state.items():
                if not got.is_meta:
                    reference = reference or _scale_reference(mlp)
                    self._check_scale(L, name, got, reference, bounds)
            key = f"layers.{L}.stats.covariance"
            if key in self.tensors and not self.tensors[key].is_meta:
                self._check_covariance(key, self.tensors[key], bounds)

    def _check_scale(self, L: int, name: str, got: torch.Tensor, reference: dict, bounds: Plausibility) -> None:
        """Expert tensor ``name`` of layer ``L`` within ``bounds.weight_scale`` of the public
        tensor's RMS and largest entry (``reference``: :func:`_scale_reference` of that layer)."""
        ref_rms, ref_max = reference[name]
        rms, peak = _rms(got), _abs_max(got)
        limit = bounds.weight_scale
        if not (rms <= limit * ref_rms and peak <= limit * ref_max):
            raise self._error(
                f"scale of layers.{L}.expert.{name}",
                f"RMS <= {limit:g} x the public tensor's ({limit * ref_rms:.3g}), "
                f"largest entry <= {limit:g} x its ({limit * ref_max:.3g})",
                f"RMS {rms:.4g}, largest entry {peak:.4g}",
            )

    def _check_covariance(self, key: str, covariance: torch.Tensor, bounds: Plausibility) -> None:
        problem = covariance_problem(covariance, bounds.covariance_tolerance)
        if problem is not None:
            raise self._error(f"values of {key}", *problem)


def _public_mlps(model: nn.Module) -> list[nn.Module]:
    """The public MLP of every decoder layer: the dense model's, or expert 0 of a flexmoe MoE."""
    if is_moe(model):
        return [b.experts[0] for b in moe_blocks(model)]
    return [layer.mlp for layer in decoder_layers(model)]


def _scale_reference(mlp: nn.Module) -> dict[str, tuple[float, float]]:
    """Per tensor of a public MLP, the ``(RMS, largest entry)`` an expert's is compared with
    (:attr:`Plausibility.weight_scale`): a zero tensor (a bias may be) takes the layer's MLP RMS,
    and the largest entry is at least the RMS."""
    public = {k: v.detach() for k, v in mlp.state_dict().items()}
    squares = sum(_rms(v) ** 2 * v.numel() for v in public.values())
    floor = math.sqrt(squares / max(1, sum(v.numel() for v in public.values())))
    reference = {}
    for name, ref in public.items():
        ref_rms = _rms(ref) or floor
        reference[name] = (ref_rms, max(_abs_max(ref), ref_rms))
    return reference


# Both from aminmax, which needs no temporary the size of the tensor (abs() and isfinite() do):
# the artifact's tensors are checked one at a time, each as large as a layer's MLP matrix.
def _abs_max(t: torch.Tensor) -> float:
    """The largest ``|entry|`` of ``t`` (0 for an empty tensor; NaN when it holds one)."""
    if not t.numel():
        return 0.0
    low, high = torch.aminmax(t)
    return max(-float(low), float(high)) if not (low.isnan() or high.isnan()) else math.nan


def _finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: a NaN makes both extremes NaN, an infinity one of them."""
    if not t.numel():
        return True
    low, high = torch.aminmax(t)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _unreadable(owner: str, source, error: Exception) -> ArtifactError:
    """safetensors' own errors for a file it cannot read, as an :class:`ArtifactError`."""
    return ArtifactError(
        owner, "file", "a readable safetensors file", f"{type(error).__name__}: {error}", source=source
    )


def _rms(t: torch.Tensor) -> float:
    """Root mean square of ``t`` in float32 (an overflow reads as ``inf``, which no bound admits)."""
    return float(torch.linalg.vector_norm(t.float()) / math.sqrt(max(1, t.numel())))


def covariance_problem(covariance: torch.Tensor, tolerance: float = 1e-3) -> tuple[str, str] | None:
    """``(expected, got)`` when ``covariance`` ``[H, H]`` is not positive semi-definite up to
    ``tolerance`` times its mean eigenvalue ``tr / H`` (Cholesky of ``C + tolerance tr/H I`` in
    float64, O(H^3/3)); ``None`` when it is. A matrix with a negative eigenvalue, pooled with the
    others by token count, can make the shared covariance indefinite and the discriminant's
    solve meaningless."""
    c = covariance.double()
    scale = float(torch.trace(c)) / c.shape[0]
    if not scale > 0:
        return "a covariance with a positive trace", f"trace {float(torch.trace(c)):.4g}"
    jitter = tolerance * scale * torch.eye(c.shape[0], dtype=c.dtype)
    _, info = torch.linalg.cholesky_ex(c + jitter)
    if int(info) != 0:
        low = float(torch.linalg.eigvalsh(c)[0])
        return (
            f"a positive semi-definite covariance (eigenvalues >= -{tolerance:g} x tr/H = {-tolerance * scale:.3g})",
            f"smallest eigenvalue {low:.4g}",
        )
    return None


def metadata_count(metadata: dict, key: str, owner: str, source=None, *, bounds: tuple[int, int] | None = None) -> int:
    """``metadata[key]`` as an ``int`` within ``bounds`` (default: :data:`_COUNTS`'s), ASCII
    decimal digits only (``'²'.isdigit()`` is true), else an :class:`ArtifactError` naming it."""
    minimum, maximum = bounds or _COUNTS[key]
    try:
        return parse_count(metadata.get(key), what=key, minimum=minimum, maximum=maximum)
    except InputError:
        raise ArtifactError(
            owner, f"metadata {key!r}", f"a decimal integer in [{minimum}, {maximum}]", metadata.get(key), source=source
        ) from None


def _check_metadata(metadata: dict, owner: str, path: Path) -> None:
    for key in _REQUIRED_METADATA:
        if key not in metadata:
            raise ArtifactError(owner, f"metadata {key!r}", "present", "missing", source=path)
    if metadata["format_version"] != FORMAT_VERSION:
        hint = ""
        if metadata["format_version"].startswith("lora-"):
            hint = (
                "a LoRA expert: load it with flexmoe.lora.LoraExpertArtifact and materialize() it on the public model"
            )
        raise ArtifactError(owner, "format_version", FORMAT_VERSION, metadata["format_version"], source=path, hint=hint)
    for key in _COUNTS:
        if key in _REQUIRED_METADATA or key in metadata:
            metadata_count(metadata, key, owner, path)
    if metadata["dtype"] not in _DTYPES:
        raise ArtifactError(owner, "metadata 'dtype'", "one of F32, F16, BF16", metadata["dtype"], source=path)


def privacy_fields(metadata: dict, owner: str, source=None) -> dict[str, object] | None:
    """The differential-privacy fields of ``metadata`` parsed and checked
    (:data:`PRIVACY_METADATA`: each float a finite decimal within its bound, the accountant one
    flexmoe knows, ``dp_covers`` distinct names from :data:`PRIVACY_COVERS`, each part's own fields
    present), or ``None`` when it has none. An :class:`ArtifactError` names the field otherwise."""
    present = [k for k in metadata if isinstance(k, str) and k.startswith("dp_")]
    if not present:
        return None

    def error(key, expected):
        return ArtifactError(owner, f"metadata {key!r}", expected, metadata.get(key), source=source)

    unknown = sorted(set(present) - set(PRIVACY_METADATA))
    if unknown:
        raise error(unknown[0], f"one of {', '.join(PRIVACY_METADATA)}")
    covers_text = metadata.get("dp_covers")
    covers = covers_text.split(",") if isinstance(covers_text, str) else []
    if not covers or len(set(covers)) != len(covers) or not set(covers) <= set(PRIVACY_COVERS):
        raise error("dp_covers", f"comma-separated distinct names from {', '.join(PRIVACY_COVERS)}")
    required = list(_PRIVACY_REQUIRED[None])
    for part in ("expert", UNIGRAM_TENSOR):
        if part in covers:
            required += _PRIVACY_REQUIRED[part]
    for key in required:
        if key not in metadata:
            raise error(key, f"present (dp_covers = {covers_text})")
    out: dict[str, object] = {"dp_covers": covers}
    if metadata["dp_accountant"] not in PRIVACY_ACCOUNTANTS:
        raise error("dp_accountant", f"one of {', '.join(PRIVACY_ACCOUNTANTS)}")
    out["dp_accountant"] = metadata["dp_accountant"]
    for key, (low, high) in _PRIVACY_FLOATS.items():
        if key not in metadata:
            continue
        text = metadata[key]
        try:
            value = float(text) if isinstance(text, str) and len(text) <= 40 else math.nan
        except ValueError:
            value = math.nan
        open_low = key != "dp_epsilon" and not key.endswith("_epsilon")
        if not (low <= value <= high) or (open_low and value == low) or (key == "dp_delta" and value >= 1):
            bracket = "(" if open_low else "["
            raise error(key, f"a decimal number in {bracket}{low:g}, {high:g}]")
        out[key] = value
    if "dp_steps" in metadata:
        out["dp_steps"] = metadata_count(metadata, "dp_steps", owner, source, bounds=(0, MAX_TOKENS))
    return out


def add_token_statistics(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    unigram: torch.Tensor | None,
    bigram: torch.Tensor | None = None,
) -> None:
    """Put the owner's token counts into an artifact's ``tensors`` and ``metadata`` (nothing for
    ``unigram=None``): ``stats.unigram`` (and ``stats.bigram``) float32 with their totals
    ``unigram_tokens`` (and ``bigram_pairs``)."""
    if unigram is None:
        if bigram is not None:
            raise ValueError("bigram counts travel only with the unigram counts of the same text")
        return
    more, totals = statistics_tensors(TokenStatistics(unigram, bigram))
    tensors.update(more)
    metadata.update(totals)


@dataclass
class MLPInputStats:
    """Per-layer moments of what each decoder layer's MLP (or MoE block) receives.

    ``mean`` ``[L, H]`` and, when asked for, ``covariance`` ``[L, H, H]`` (float64, divided by
    ``count``); ``count`` tokens. ``mean`` is what an owner shares for :func:`lda_router`.
    """

    mean: torch.Tensor
    count: int
    covariance: torch.Tensor | None = None
