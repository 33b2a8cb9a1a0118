"""The coordinator's merge: ``[public, e_1 ... e_n]`` from the owners' expert files (FlexOlmo step 3).

One assembly pipeline, :func:`merge_experts`, serves the CLI (``flexmoe assemble``), the Flower
coordinator and the demo, in this order:

1. **assemble** (:func:`assemble`): validate every artifact against the public model, then stack
   ``[public, e_1 ... e_n]`` per layer with router rows ``[r_0, r_1 ... r_n]`` and biases
   ``[0, b_1 ... b_n]`` (Shi et al., 2025, section 3.3);
2. **route** by the recipe (:class:`~flexmoe.spec.RoutingRecipe`): ``posterior`` (the default)
   converts the merge's routers with :func:`~flexmoe.core.posterior.use_posterior_routers`, from
   the token counts ``[public, owner_1 .. owner_n]`` (the owners' from their artifacts, the
   public data's from the spec's public-statistics file or the public text); ``published`` keeps
   the owners' rows; ``lda`` (the token router) builds the discriminant router from the
   statistics the owners shipped and the public text (:func:`flexmoe.routing.route`);
3. **fold** the discriminant's biases into the rows when the target is a ``transformers`` format,
   whose routers have no bias (:func:`~flexmoe.formats.export.target_format`);
4. **write** the format asked for (:data:`~flexmoe.formats.export.DEFAULT_FORMAT` unless told;
   ``auto`` is native for a posterior-routed model, whose gates no ``transformers`` class holds).

A ``posterior`` recipe asked for a FlexOlmo or Mixtral export by name builds the recipe's token
router instead (:meth:`~flexmoe.spec.RoutingRecipe.token_router`: ``lda``, folded) and says so:
the summary and the export's ``flexmoe_config.json`` record ``"router": "token (lda)"``
(:func:`built_recipe`).

Three rules hold for every caller:

* ``r_0`` is the public row the owners trained against (the spec's ``r_pub``), read from the
  artifacts, which must agree; an owner's row and bias only mean what they did in training next
  to that ``r_0``, so a merge of one owner's expert is that owner's own trained model.
* The public text is packed into rows of the spec's ``expert.seq_len`` (the owners' statistics were
  taken on rows that long); without a spec, of ``seq_len``, :data:`~flexmoe.spec.DEFAULT_SEQ_LEN`
  unless given.
* A recipe that needs the owners' statistics refuses, naming every owner without them
  (:class:`MissingRoutingStatistics`), rather than routing some other way; so does a recipe that
  needs public statistics nobody gave (:func:`check_public_source`).

The module is a little over 600 lines on purpose: the in-memory and the streamed assembly share
these rules and their checks, and splitting them would put one pipeline in two places.

:func:`assemble_to_dir` streams the published merge to disk one artifact tensor at a time, so
memory grows with neither the number of owners nor the size of their experts; :func:`merge_experts`
uses it when asked to ``stream``. This floor sits above ``formats`` and ``routing``, which it
composes, and below the owner side and training, which never need it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoTokenizer

from flexmoe.artifacts.expert import LAYER_INDEX, ExpertArtifact, ExpertFile
from flexmoe.artifacts.guard import (
    MAX_OWNER_NAME,
    ArtifactError,
    HeaderBounds,
    check_owner_name,
    read_safetensors_header,
)
from flexmoe.artifacts.load import is_lora_file, load_expert
from flexmoe.artifacts.unigram import (
    BIGRAM_TENSOR,
    UNIGRAM_TENSOR,
    TokenStatistics,
    has_token_statistics,
    load_public_statistics,
)
from flexmoe.core.errors import InputError
from flexmoe.core.hashing import ContentHash, fingerprint
from flexmoe.core.io import atomic_write_text
from flexmoe.core.moe import Router
from flexmoe.core.posterior import use_posterior_routers
from flexmoe.core.provenance import ExpertProvenance, Provenance
from flexmoe.core.surgery import PUBLIC, add_expert, decoder_layers, is_moe, moe_blocks, set_top_k, settings, upcycle
from flexmoe.data.packing import pack_domain
from flexmoe.data.statistics import packed_token_statistics
from flexmoe.formats.export import (
    DEFAULT_FORMAT,
    FLEXMOE_CONFIG,
    dense_tensors,
    export,
    mlp_prefixes,
    target_format,
    tokenizer_files,
    write_checkpoint,
)
from flexmoe.formats.load import load_public_model
from flexmoe.routing import route
from flexmoe.spec import DEFAULT_SEQ_LEN, FederationSpec, RoutingRecipe

ArtifactLike = ExpertFile | str | os.PathLike
# An owner's MLP weight in its artifact: layers.{L}.expert.{name}.
_EXPERT_TENSOR = re.compile(rf"layers\.{LAYER_INDEX}\.expert\.(.+)")


# -- step 1: assemble ---------------------------------------------------------------------------


def assemble(
    public_model: nn.Module,
    artifacts: Sequence[ArtifactLike],
    top_k: int | None = None,
    *,
    normalize: bool = False,
    spec_sha256: str | None = None,
    public_router_embedding=None,
    bounds: HeaderBounds | None = None,
) -> nn.Module:
    """Build the merged ``[public, e_1 ... e_n]`` MoE (FlexOlmo step 3), **in place**.

    ``public_model`` is the dense public model (upcycled here) or a flexmoe MoE that has
    only the public expert. Artifacts (objects or paths; a path may hold a LoRA-sized expert,
    materialised by :func:`load_expert`) are validated against it: the fingerprint must match,
    and ``spec_sha256`` too when given.

    Router row 0 is set to the ``r_0`` the owners trained against (:func:`public_router_rows`):
    ``public_router_embedding`` is the spec's ``r_pub`` (``[H]`` or ``[L, H]``), which the
    artifacts must match; files too old to record their ``r_0`` are taken to have used it.
    ``bounds``: what each file may hold (:func:`load_expert`; default from ``public_model``'s
    config). Every artifact is validated, plausibility included
    (:class:`~flexmoe.artifacts.expert.Plausibility`), before the model is touched.
    """
    if is_moe(public_model) and settings(public_model).num_experts != 1:
        raise InputError("assemble() takes the public model (dense, or a MoE with only the public expert)")
    fp = fingerprint(public_model)
    if bounds is None and not all(isinstance(a, ExpertArtifact) for a in artifacts):
        bounds = HeaderBounds.for_expert(public_model.config)
    loaded = [
        a
        if isinstance(a, ExpertArtifact)
        else load_expert(a, public_model, fingerprint=fp, spec_sha256=spec_sha256, bounds=bounds)
        for a in artifacts
    ]
    for a in loaded:
        check_owner(a.owner, a.source)
        a.validate(public_model, fingerprint=fp, spec_sha256=spec_sha256)
    owners = [PUBLIC] + [a.owner for a in loaded]
    if len(set(owners)) != len(owners):
        raise InputError(f"owner names must be distinct and not {PUBLIC!r}; the experts' owners are {owners[1:]}")
    if top_k is not None and not 1 <= top_k <= len(owners):
        raise InputError(f"top_k must be between 1 and the number of experts ({len(owners)}), got {top_k}")
    mlp = decoder_layers(public_model)[0].mlp
    dtype = next((mlp.experts[0] if is_moe(public_model) else mlp).parameters()).dtype
    r_0 = public_router_rows(
        {a.owner: a.public_router_rows for a in loaded},
        (len(decoder_layers(public_model)), public_model.config.hidden_size),
        dtype,
        public_router_embedding,
        sources={a.owner: a.source for a in loaded},
    )
    model = public_model if is_moe(public_model) else upcycle(public_model, num_experts=0, normalize=normalize)
    with torch.no_grad():
        for L, block in enumerate(moe_blocks(model)):
            block.router.weight[0].copy_(r_0[L])
    for a in loaded:
        add_expert(model, a, check_fingerprint=False)
    set_top_k(model, top_k)
    return model


def public_router_rows(
    carried: dict[str, torch.Tensor | None],
    shape: tuple[int, int],
    dtype: torch.dtype,
    public_router_embedding=None,
    *,
    sources: dict[str, str | None] | None = None,
) -> torch.Tensor:
    """The public expert's router rows ``r_0`` ``[L, H]`` for a merge of the artifacts whose
    recorded ``r_0`` (``None`` for a file too old to record one) ``carried`` maps by owner.

    Owners train ``r_j`` and ``beta_j`` against a frozen ``r_0`` (the spec's ``r_pub``, or zeros
    when it has none), and the softmax only sees ``r_j - r_0``: the merge must use that same
    ``r_0``. So every artifact's must be equal, and equal to ``public_router_embedding`` (the
    spec's ``r_pub``, ``[H]`` or ``[L, H]``) when it is given. An artifact without a record is
    taken to have trained against ``public_router_embedding``, or zeros (with a warning) when
    there is none. Any disagreement is an :class:`ArtifactError` naming the owner.
    """
    layers, hidden = shape
    sources = sources or {}
    if public_router_embedding is not None:
        assumed = torch.as_tensor(public_router_embedding, dtype=torch.float32)
        if assumed.dim() == 1:
            assumed = assumed.expand(layers, -1)
        if tuple(assumed.shape) != (layers, hidden):
            raise InputError(
                f"the spec's public_router_embedding is {list(assumed.shape)}, but the public model needs "
                f"[{layers}, {hidden}] (or [{hidden}] for every layer)"
            )
        assumed = assumed.to(dtype)
        reference, expected = assumed, "the spec's public_router_embedding (r_pub)"
        hint = "the expert was trained against another public router row: was it trained under this spec?"
    else:
        assumed = torch.zeros(layers, hidden, dtype=dtype)
        first = next((o for o, rows in carried.items() if rows is not None), None)
        reference = assumed if first is None else carried[first].to(dtype)
        expected = f"the rows recorded by {first!r}"
        hint = "the experts were trained against different public router rows, i.e. under different specs"
    for owner, rows in carried.items():
        if torch.equal(assumed if rows is None else rows.to(dtype), reference):
            continue
        got = "different rows"
        if rows is None:
            got = "no record (a file written before artifacts carried it), so zeros"
            hint = "give the FederationSpec it was trained under (spec=..., --spec), whose r_pub it used"
        raise ArtifactError(owner, "router.public_embedding (r_0)", expected, got, source=sources.get(owner), hint=hint)
    unrecorded = [o for o, rows in carried.items() if rows is None]
    if unrecorded and public_router_embedding is None:
        warnings.warn(
            f"the artifacts of {unrecorded} do not record the public router row r_0 they were trained against "
            "(written before artifacts carried it); assuming zeros. If their spec set public_router_embedding, "
            "give the spec (spec=..., --spec), or the merge will not reproduce what they trained",
            stacklevel=3,
        )
    return reference


# -- the rules shared by every caller -----------------------------------------------------------


def check_owner(owner, source=None) -> None:
    """Refuse an owner name that a merged model could not carry (empty, a path, control
    characters, surrounding spaces: :func:`~flexmoe.artifacts.guard.check_owner_name`), which
    would otherwise be written into ``flexmoe_config.json`` and refused when the model is reopened."""
    if not check_owner_name(owner):
        raise ArtifactError(
            str(owner),
            "owner",
            f"1 to {MAX_OWNER_NAME} printable characters, no '/' or '\\', not '.' or '..', no surrounding spaces",
            repr(owner),
            source=source,
        )


class MissingRoutingStatistics(InputError):
    """The routing recipe needs statistics that some owners did not ship. ``owners`` names them."""

    def __init__(self, owners: Sequence[str], recipe: RoutingRecipe):
        self.owners, self.recipe = list(owners), recipe
        if recipe.needs_unigram:
            message = (
                f"owner(s) {self.owners} shipped no token counts ({statistics_needed(recipe)}), which the "
                f"routing recipe 'posterior' needs. {UNIGRAM_HINT}"
            )
        else:
            message = (
                f"owner(s) {self.owners} shipped no routing statistics ({statistics_needed(recipe)}), which the "
                f"routing recipe {recipe.method!r} (covariance {recipe.covariance!r}) needs. {STATISTICS_HINT}"
            )
        super().__init__(message)


STATISTICS_HINT = (
    "An owner's artifact carries them when it trains under a spec whose routing recipe asks for them: have "
    "those owners retrain under this spec, or choose the routing recipe 'published' (the owners' router rows "
    "stacked, FlexOlmo's merge as published)"
)


UNIGRAM_HINT = (
    "Every owner's training run with this flexmoe version (`flexmoe train-expert`) writes them: have those "
    "owners retrain, or choose the routing recipe 'lda' (the token router, from the MLP-input statistics) "
    "or 'published'"
)
TRANSFORMERS_FORMATS = ("flexolmo", "mixtral")
TOKEN_ROUTER_NOTE = (
    "the {format} export carries the recipe's token router (lda, folded), not the posterior router, which "
    "only the native format holds"
)


def built_recipe(recipe: RoutingRecipe, format: str) -> RoutingRecipe:
    """The recipe the merged model is actually routed by for an export in ``format``: ``recipe``,
    except that a ``posterior`` recipe asked for a FlexOlmo or Mixtral export by name builds its
    token router (:meth:`~flexmoe.spec.RoutingRecipe.token_router`), since no ``transformers``
    gate can hold a posterior over the prefix; ``auto`` stays posterior and goes native."""
    return recipe.token_router() if recipe.needs_unigram and format in TRANSFORMERS_FORMATS else recipe


def statistics_needed(recipe: RoutingRecipe) -> str | None:
    """What each owner must ship for ``recipe`` as built (:func:`built_recipe`), in words
    (``None``: nothing)."""
    if recipe.needs_bigram:
        return (
            f"its training text's token unigram counts, {UNIGRAM_TENSOR}, and its bigram counts in "
            f"{recipe.bigram_buckets} buckets, {BIGRAM_TENSOR}"
        )
    if recipe.needs_unigram:
        return f"its training text's token unigram counts, {UNIGRAM_TENSOR}"
    kind = recipe.owner_statistics
    if kind is None:
        return None
    return "the mean and covariance of its MLP inputs" if kind == "covariance" else "the mean of its MLP inputs"


def lacks_statistics(artifact: ArtifactLike, recipe: RoutingRecipe) -> bool:
    """Whether ``artifact`` (an object, or a file whose header alone is read) lacks the
    statistics ``recipe`` (as built: :func:`built_recipe`) needs."""
    if recipe.needs_unigram:
        return not has_token_statistics(artifact, bigram=recipe.needs_bigram)
    kind = recipe.owner_statistics
    if kind is None:
        return False
    names = set(artifact.tensors) if isinstance(artifact, ExpertFile) else set(read_safetensors_header(artifact))
    need = {"layers.0.stats.mean"} | ({"layers.0.stats.covariance"} if kind == "covariance" else set())
    return not need <= names


def check_statistics(artifacts: Sequence[ArtifactLike], recipe: RoutingRecipe) -> None:
    """Raise :class:`MissingRoutingStatistics` naming every owner whose artifact lacks what
    ``recipe`` needs (headers only for files: no weight is read)."""
    missing = [_owner(a) for a in artifacts if lacks_statistics(a, recipe)]
    if missing:
        raise MissingRoutingStatistics(missing, recipe)


def check_public_source(
    recipe: RoutingRecipe,
    spec: FederationSpec | None,
    spec_path: str | os.PathLike | None,
    public_documents: Sequence[str] | None,
) -> None:
    """Refuse, saying what to pass, a merge whose recipe (as built) needs public statistics that
    nobody gave: ``lda`` the public text; ``posterior`` the spec's public-statistics file (a spec
    given by path, or with ``spec_path``) or the public text."""
    if recipe.method == "lda" and public_documents is None:
        raise InputError(
            f"the routing recipe {recipe.method!r} needs public text for its public statistics (public_documents; "
            "--public-data on the command line, run config 'public-data' for the coordinator), or choose the "
            "recipe 'published'"
        )
    if recipe.needs_unigram and public_documents is None and not _has_public_file(spec, spec_path):
        where = ""
        if spec is not None and spec.public_statistics is not None:
            where = " (the spec records a public-statistics file, but was given without its path: pass spec_path)"
        raise InputError(
            "the routing recipe 'posterior' needs the public domain's token counts: pass the public text "
            "(public_documents; --public-data on the command line, run config 'public-data' for the coordinator) "
            f"or a spec that carries public statistics (written by `flexmoe spec --public-data ...`){where}; or "
            "choose the routing recipe 'published'"
        )


def _has_public_file(spec: FederationSpec | None, spec_path) -> bool:
    return spec is not None and spec.public_statistics is not None and spec_path is not None


def public_token_statistics(
    recipe: RoutingRecipe,
    spec: FederationSpec | None,
    spec_path: str | os.PathLike | None,
    public_documents: Sequence[str] | None,
    tokenizer,
    seq_len: int,
    vocab_size: int,
) -> tuple[TokenStatistics, str]:
    """The public domain's token counts (unigrams ``float32 [vocab_size]``, and bigrams when
    ``recipe`` routes by them) and where they came from: the spec's public-statistics file when
    the spec records one (checked by its sha256), else the public text packed as owners pack
    theirs (rows of ``seq_len``, EOS after each document), so both count the same kind of stream."""
    buckets = recipe.bigram_buckets if recipe.needs_bigram else 0
    if _has_public_file(spec, spec_path):
        return load_public_statistics(spec, spec_path, vocab_size, bigram_buckets=buckets), "spec"
    packer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    return packed_token_statistics(list(public_documents), packer, seq_len, vocab_size, buckets), "public_documents"


def resolve_seq_len(spec: FederationSpec | None, seq_len: int | None = None) -> int:
    """The length of the packed public rows the routing statistics are taken on: the spec's
    ``expert.seq_len`` (the owners' statistics were taken on rows that long), else ``seq_len``,
    else :data:`~flexmoe.spec.DEFAULT_SEQ_LEN`."""
    if spec is None:
        return DEFAULT_SEQ_LEN if seq_len is None else seq_len
    if seq_len is not None and seq_len != spec.expert.seq_len:
        raise InputError(
            f"seq_len {seq_len} differs from the spec's expert.seq_len {spec.expert.seq_len}; the spec fixes it "
            "(the owners' statistics were taken on rows that long): leave seq_len out"
        )
    return spec.expert.seq_len


def routing_recipe(spec: FederationSpec | None, routing: RoutingRecipe | str | None = None) -> RoutingRecipe:
    """The recipe a merge routes by: ``routing`` when it is a recipe; a method name applied to the
    spec's recipe (or the default one); with neither, the spec's recipe, or the default."""
    if isinstance(routing, RoutingRecipe):
        return routing
    base = spec.routing if spec is not None else RoutingRecipe()
    return base if routing is None else dataclasses.replace(base, method=routing)


def _is_full_file(artifact: ArtifactLike) -> bool:
    return not isinstance(artifact, ExpertFile) and not is_lora_file(artifact)


def _owner(artifact: ArtifactLike) -> str:
    if isinstance(artifact, ExpertFile):
        return artifact.owner
    metadata = read_safetensors_header(artifact).get("__metadata__") or {}
    owner = metadata.get("owner")
    return owner if isinstance(owner, str) else Path(artifact).name


# -- steps 1 to 4 -------------------------------------------------------------------------------


@dataclass
class MergedModel:
    """What :func:`merge_experts` built: the MoE (``None`` when it was streamed to disk), the
    routing summary, the format asked for, and the export directory when one was written."""

    model: nn.Module | None
    routing: dict
    format: str
    out: Path | None = None
    tokenizer: object = None

    def export(self, out, *, allow_approximate: bool = False) -> Path:
        """Write the model in the format asked for (after router tuning, say), with the public
        model's tokenizer. Routers the pipeline folded export exactly to a ``transformers`` format."""
        self.out = export(
            self.model, out, format=self.format, allow_approximate=allow_approximate, tokenizer=self.tokenizer
        )
        if "recipe" in self.routing:  # a posterior recipe: say which router the export carries
            config = Path(self.out) / FLEXMOE_CONFIG
            meta = json.loads(config.read_text())
            meta["routing"] = {k: v for k, v in self.routing.items() if isinstance(v, (str, int, float, bool))}
            atomic_write_text(config, json.dumps(meta, indent=2) + "\n")
        return self.out


def merge_experts(
    public_model: nn.Module | str | os.PathLike,
    artifacts: Sequence[ArtifactLike],
    *,
    spec: FederationSpec | str | os.PathLike | None = None,
    spec_path: str | os.PathLike | None = None,
    routing: RoutingRecipe | str | None = None,
    public_documents: Sequence[str] | None = None,
    tokenizer=None,
    seq_len: int | None = None,
    format: str = DEFAULT_FORMAT,
    top_k: int | None = None,
    normalize: bool = False,
    spec_sha256: str | None = None,
    out: str | os.PathLike | None = None,
    allow_approximate: bool = False,
    stream: bool = False,
) -> MergedModel:
    """The owners' experts and the public model -> the merged MoE: assemble, route by the recipe,
    fold the router biases for a ``transformers`` format, and (with ``out``) write the export.

    Args:
        public_model: the dense public model, or its directory (loaded in float32, as owners load it).
        artifacts: the owners' experts in expert order: :class:`~flexmoe.ExpertArtifact`\\ s or
            files (full or LoRA-sized).
        spec: the :class:`~flexmoe.FederationSpec` (or its JSON) the experts were trained under:
            it checks their spec hash and supplies ``r_pub``, the routing recipe, ``seq_len`` and
            (given by path, or with ``spec_path``) the public domain's token counts.
        spec_path: where a ``spec`` given as an object was loaded from, for its public-statistics
            file (:func:`~flexmoe.artifacts.unigram.load_public_statistics`).
        routing: a :class:`~flexmoe.spec.RoutingRecipe`, or a method name (``"posterior"``,
            ``"lda"``, ``"published"``) applied to the spec's recipe; default: the spec's, or
            ``posterior``.
        public_documents: public text for the recipe's public statistics: ``lda`` needs it;
            ``posterior`` counts its tokens when the spec carries no public statistics.
        tokenizer: the public model's tokenizer, or its directory (default: ``public_model``'s
            directory); packs the public text and travels with the export.
        seq_len: tokens per packed public row, only without a spec (:func:`resolve_seq_len`).
        format: ``auto`` (the base's exact ``transformers`` format, else native; native for the
            posterior router), ``flexolmo``, ``mixtral`` or ``native``. A routing recipe with biases
            is folded unless the target is native. With the ``posterior`` recipe, ``flexolmo`` or
            ``mixtral`` gets the recipe's token router (:func:`built_recipe`), labelled as such.
        top_k, normalize: experts per token (``None``: all); renormalise the top-k weights.
        spec_sha256: refuse artifacts not trained under this spec hash (default: ``spec``'s).
        out: write the export here (a new or empty directory).
        allow_approximate: let an explicitly named ``transformers`` format drop what it cannot hold.
        stream: only the export is wanted: with the ``published`` recipe and artifact files that
            are all full experts, write ``out`` one tensor at a time (:func:`assemble_to_dir`)
            and return no model. Other recipes need the model in memory.

    Returns the :class:`MergedModel`; its ``routing`` summary names the ``method`` the model routes
    by and, for a ``posterior`` recipe, the ``recipe``, the ``router`` the export carries and the
    recipe's settings.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec_path = spec_path or spec
        spec = FederationSpec.load(spec)
    if spec is not None:
        spec_sha256 = spec_sha256 or spec.sha256
    asked = routing_recipe(spec, routing)
    recipe = built_recipe(asked, format)
    seq_len = resolve_seq_len(spec, seq_len)
    r_pub = spec.public_router_embedding if spec is not None else None
    check_statistics(artifacts, recipe)
    check_public_source(recipe, spec, spec_path, public_documents)
    if asked.needs_unigram and format == "auto":
        format = "native"  # no transformers gate holds a posterior over the prefix
    if tokenizer is None and isinstance(public_model, (str, os.PathLike)):
        tokenizer = public_model
    streamable = stream and out is not None and recipe.method == "published"
    if streamable and isinstance(public_model, (str, os.PathLike)) and all(_is_full_file(a) for a in artifacts):
        written = assemble_to_dir(
            public_model,
            list(artifacts),
            out,
            format=format,
            top_k=top_k,
            normalize=normalize,
            spec_sha256=spec_sha256,
            allow_approximate=allow_approximate,
            public_router_embedding=r_pub,
            bigram_buckets=asked.bigram_buckets or None,
        )
        return MergedModel(None, {"method": "published"}, format, written, tokenizer)
    public = load_public_model(public_model).eval()
    fp = fingerprint(public)
    bounds = HeaderBounds.for_expert(public.config, bigram_buckets=asked.bigram_buckets or None)
    loaded = [
        a
        if isinstance(a, ExpertArtifact)
        else load_expert(a, public, fingerprint=fp, spec_sha256=spec_sha256, bounds=bounds)
        for a in artifacts
    ]
    model = assemble(
        public, loaded, top_k=top_k, normalize=normalize, spec_sha256=spec_sha256, public_router_embedding=r_pub
    )
    needs_tokenizer = recipe.method == "lda" or (recipe.needs_unigram and not _has_public_file(spec, spec_path))
    if needs_tokenizer and tokenizer is None:
        raise InputError("the routing recipe packs the public text with the public model's tokenizer: pass tokenizer")
    if recipe.needs_unigram:
        vocab_size = public.config.vocab_size
        counts, source = public_token_statistics(
            recipe, spec, spec_path, public_documents, tokenizer, seq_len, vocab_size
        )
        buckets = recipe.bigram_buckets if recipe.needs_bigram else None
        for a in loaded:  # the bucket count is the recipe's: a file can only be checked against it here
            a.check_token_statistics(vocab_size, buckets)
        use_posterior_routers(
            model,
            torch.stack([counts.unigram, *(a.unigram for a in loaded)]),
            temperature=recipe.temperature,
            smoothing=recipe.smoothing,
            reset_at_eos=recipe.reset_at_eos,
            bigram=torch.stack([counts.bigram, *(a.bigram for a in loaded)]) if buckets else None,
            bigram_weight=recipe.bigram_weight,
        )
        summary = {**recipe.settings(), "recipe": "posterior", "router": "posterior", "public_statistics": source}
        summary["public_tokens"] = int(counts.unigram.double().sum())
        summary["seq_len"] = seq_len
    elif recipe.method == "published":
        summary = route(model, loaded, None, recipe)
    else:
        packer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        rows = pack_domain(list(public_documents), packer, seq_len)
        summary = route(model, loaded, rows, recipe, exportable=target_format(model, format) != "native")
        summary["seq_len"] = seq_len
    if asked.needs_unigram and not recipe.needs_unigram:
        summary.update(recipe="posterior", router="token (lda)", note=TOKEN_ROUTER_NOTE.format(format=format))
    settings(model).provenance.set_routing(summary)  # the model card names the recipe
    merged = MergedModel(model.eval(), summary, format, tokenizer=tokenizer)
    if out is not None:
        merged.export(out, allow_approximate=allow_approximate)
    return merged


# -- streaming the published merge --------------------------------------------------------------


class _ArtifactSource:
    """The dense public model plus owners' artifact files (what :func:`assemble_to_dir` writes).

    Up front, each file's header is checked (size, truncation, fingerprint, spec, owner) and
    only its router rows are read. The full validation (shapes, dtypes, NaN/Inf, plausibility,
    fit to the public model) happens when its shard is written (:meth:`expert_stream`), one
    tensor at a time, so no artifact is ever held whole; its provenance is recorded then, as
    :func:`~flexmoe.core.surgery.add_expert` would; a failure there discards the unfinished export.
    """

    def __init__(
        self, public: nn.Module, paths, *, top_k, normalize, spec_sha256, public_router_embedding=None, bounds=None
    ):
        self.model, self.config = public, public.config
        self.bounds = bounds or HeaderBounds.for_expert(public.config)
        self.top_k, self.normalize, self.spec_sha256 = top_k, normalize, spec_sha256
        self.paths = [Path(p) for p in paths]
        self.mlp_prefixes = mlp_prefixes(public)
        self.fingerprint = fingerprint(public)
        self.owners = [PUBLIC]
        self.provenance = Provenance(routing={"method": "published"})
        self._router_rows = []  # per artifact and layer: (embedding, bias, public row or None) as read up front
        sources = {}
        for path in self.paths:
            metadata = read_safetensors_header(path, bounds=self.bounds).get("__metadata__") or {}
            owner = metadata.get("owner", path.name)
            stub = ExpertArtifact(owner=owner, tensors={}, metadata=metadata, source=str(path))
            check_owner(stub.owner, path)
            stub.check_identity(fingerprint=self.fingerprint, spec_sha256=spec_sha256)
            if stub.owner in self.owners:
                raise ArtifactError(
                    stub.owner, "owner", "a name not yet in the model", f"a second {stub.owner!r}", source=path
                )
            self.owners.append(stub.owner)
            sources[stub.owner] = str(path)
            self._router_rows.append(_read_router_rows(stub, len(self.mlp_prefixes), self.config.hidden_size))
        if top_k is not None and not 1 <= top_k <= len(self.owners):
            raise InputError(f"top_k must be between 1 and the number of experts ({len(self.owners)}), got {top_k}")
        dtype = next(decoder_layers(public)[0].mlp.parameters()).dtype
        recorded = {}
        for owner, rows in zip(self.owners[1:], self._router_rows, strict=True):
            recorded[owner] = None if rows[0][2] is None else torch.stack([r[2] for r in rows])
        r_0 = public_router_rows(
            recorded,
            (len(self.mlp_prefixes), self.config.hidden_size),
            dtype,
            public_router_embedding,
            sources=sources,
        )
        self._routers = []
        for L in range(len(self.mlp_prefixes)):
            rows = [r_0[L]] + [r[L][0].to(dtype) for r in self._router_rows]
            biases = [torch.zeros(1)] + [r[L][1].float() for r in self._router_rows]
            self._routers.append((torch.stack(rows), torch.cat(biases)))

    def dense_tensors(self):
        return dense_tensors(self.model, self.mlp_prefixes)

    def routers(self) -> list[Router]:
        return [Router.from_rows(w, b) for w, b in self._routers]  # what assemble() builds, per layer

    def expert(self, j: int) -> list[dict[str, torch.Tensor]]:
        if j == 0:
            return [layer.mlp.state_dict() for layer in decoder_layers(self.model)]
        state, tensors = self.expert_stream(j)
        for L, name, t in tensors:
            state[L][name] = t
        return state

    def expert_stream(self, j: int) -> tuple[list[dict[str, torch.Tensor]], Iterator[tuple[int, str, torch.Tensor]]]:
        """Owner expert ``j`` (``j >= 1``) as :func:`~flexmoe.formats.export.write_shard_streamed`
        writes it: the per-layer state dicts of what the file declares (``meta`` tensors, whose
        names, shapes and dtypes are already checked against the public model), and an iterator
        of ``(layer, name, tensor)`` that reads the MLP weights one at a time.

        The iterator reads every tensor of the file in sorted name order, checks its values as
        :meth:`~flexmoe.artifacts.expert.ExpertArtifact.validate` would (plausibility included)
        and hashes it; only when the last one has passed does it record the expert's provenance.
        A failure raises from the iterator, and the unfinished export is discarded."""
        art = ExpertArtifact.open(
            self.paths[j - 1], fingerprint=self.fingerprint, spec_sha256=self.spec_sha256, bounds=self.bounds
        )
        art.validate(self.model, fingerprint=self.fingerprint, spec_sha256=self.spec_sha256)
        for L, (emb, bias, _) in enumerate(self._router_rows[j - 1]):
            _, emb2, bias2 = art.layer(L)
            if not (torch.equal(emb, emb2) and torch.equal(bias, bias2)):
                changed = "different contents (the file changed during assembly)"
                raise ArtifactError(
                    art.owner, f"layers.{L}.router", "the contents read at the start", changed, source=art.source
                )
        return [art.layer(L)[0] for L in range(len(self.mlp_prefixes))], self._read(art)

    def _read(self, art: ExpertArtifact) -> Iterator[tuple[int, str, torch.Tensor]]:
        content = ContentHash()
        for name, t in art.read_tensors(self.model):
            content.add(name, t)
            m = _EXPERT_TENSOR.fullmatch(name)
            if m is not None:
                yield int(m.group(1)), m.group(2), t
            del t  # one tensor at a time
        self.provenance.add(ExpertProvenance.of(art.owner, art.metadata, art.tensors, content.hexdigest(art.metadata)))

    def renormalisation_gap(self) -> float | None:
        return None  # would need the whole MoE in memory, which is what this source avoids


def _read_router_rows(artifact: ExpertArtifact, num_layers: int, hidden: int) -> list[tuple]:
    """Just the router embedding [hidden], bias [1] and recorded public row [hidden] (``None`` in
    a file too old to carry it) of every layer, not the expert weights."""
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
            rows = []
            for L, (e, b) in enumerate(names):
                public = f"layers.{L}.router.public_embedding"
                rows.append((f.get_tensor(e), f.get_tensor(b), f.get_tensor(public) if public in present else None))
    except ArtifactError:
        raise
    except Exception as e:  # safetensors' own errors for unreadable files
        raise ArtifactError(
            artifact.owner, "file", "a readable safetensors file", f"{type(e).__name__}: {e}", source=artifact.source
        ) from e
    for L, (emb, bias, public) in enumerate(rows):
        if list(emb.shape) != [hidden] or list(bias.shape) != [1] or (public is not None and public.dim() != 1):
            got = f"layers.{L}.router.embedding {list(emb.shape)}, layers.{L}.router.bias {list(bias.shape)}"
            raise ArtifactError(artifact.owner, "router shapes", f"[{hidden}] and [1]", got, source=artifact.source)
        if public is not None and list(public.shape) != [hidden]:
            name = f"shape of layers.{L}.router.public_embedding"
            raise ArtifactError(artifact.owner, name, [hidden], list(public.shape), source=artifact.source)
    if len({r[2] is None for r in rows}) > 1:
        raise ArtifactError(
            artifact.owner, "router.public_embedding", "in every layer or in none", "in some", source=artifact.source
        )
    return rows


def assemble_to_dir(
    public_dir,
    artifact_paths: Sequence[str | os.PathLike],
    out_dir,
    *,
    format: str = DEFAULT_FORMAT,
    top_k: int | None = None,
    normalize: bool = False,
    spec_sha256: str | None = None,
    allow_approximate: bool = False,
    public_router_embedding=None,
    bigram_buckets: int | None = None,
) -> Path:
    """FlexOlmo step 3 straight to disk: ``[public, e_1 ... e_n]`` without building the MoE.

    Loads the dense public model once (float32, as owners load it), validates every artifact
    against it (fingerprint, and ``spec_sha256`` when given), then writes the public shard and one
    shard per artifact, reading, checking and writing one artifact tensor at a time (never a
    whole artifact: docs/scale.md). The result equals
    ``export(assemble(public, artifacts, top_k, normalize=normalize, public_router_embedding=...),
    out_dir, format)``. Tokenizer files in ``public_dir`` are copied along. Every file is read
    within :meth:`~flexmoe.artifacts.guard.HeaderBounds.for_expert` of the public config
    (``bigram_buckets``: the recipe's, default the largest table allowed).
    """
    public = load_public_model(public_dir).eval()
    source = _ArtifactSource(
        public,
        artifact_paths,
        top_k=top_k,
        normalize=normalize,
        spec_sha256=spec_sha256,
        public_router_embedding=public_router_embedding,
        bounds=HeaderBounds.for_expert(public.config, bigram_buckets=bigram_buckets),
    )
    return write_checkpoint(
        source, out_dir, format, allow_approximate=allow_approximate, files=tokenizer_files(public_dir)
    )
