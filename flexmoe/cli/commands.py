"""The ``flexmoe`` command line: each command is a plain typed function, exposed by jsonargparse.

::

    flexmoe spec --public PUBLIC_DIR --public-data public_text/ --out spec.json
    flexmoe train-expert --spec spec.json --data my_text/ --owner clinic --out clinic.safetensors
    flexmoe assemble --public PUBLIC_DIR --experts a.safetensors b.safetensors --out merged/ --format flexolmo
    flexmoe export --model merged/ --format native --out merged_native/
    flexmoe add-expert --model merged/ --expert c.safetensors --out merged_abc/
    flexmoe opt-out --model merged/ --owner b --out merged_without_b/
    flexmoe export --model merged/ --evaluation eval.json --out merged_card/
    flexmoe tune-router --model merged/ --proxy a=a.proxy.json --public-data public_text/ --out tuned/

Every command also takes ``--config FILE.yaml`` (and ``--print_config`` to write one), as
jsonargparse provides. On top of jsonargparse's own syntax, :func:`normalize_argv` accepts
the spellings people type: ``--top-k`` for ``--top_k``, ``--experts a b`` for
``--experts '["a", "b"]'``, and a bare ``--normalize`` for ``--normalize true``.

A mistake in the input (a corrupt artifact, a wrong fingerprint, a missing directory)
prints one line, ``flexmoe: error: ...``, and exits with status 1; set ``FLEXMOE_DEBUG=1``
for the traceback. A new command is a typed function plus one line in :data:`COMMANDS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer

from flexmoe.artifacts.guard import HeaderBounds
from flexmoe.artifacts.load import load_expert
from flexmoe.artifacts.unigram import require_token_statistics, write_public_statistics
from flexmoe.assembly import merge_experts
from flexmoe.core.errors import InputError
from flexmoe.core.hashing import fingerprint
from flexmoe.core.parsing import read_json
from flexmoe.core.posterior import PosteriorRouter
from flexmoe.core.surgery import PUBLIC, moe_blocks, set_top_k, settings
from flexmoe.core.surgery import add_expert as add_to_model
from flexmoe.core.surgery import opt_out as remove_from_model
from flexmoe.data.documents import read_documents
from flexmoe.data.statistics import packed_token_statistics
from flexmoe.evaluate import eval_models, parse_domains
from flexmoe.formats.export import DEFAULT_FORMAT, FORMATS
from flexmoe.formats.export import export as export_model
from flexmoe.formats.load import detect_format, load, load_public_model
from flexmoe.formats.model_card import evaluation_from_result
from flexmoe.merge.config import merge as merge_recipe
from flexmoe.owner.embed import router_embedding
from flexmoe.owner.proxy import ProxySelection
from flexmoe.spec import (
    DEFAULT_EMBEDDER,
    ExpertRecipe,
    FederationSpec,
    ProxyBudget,
    RouterTuningRecipe,
    RoutingRecipe,
)

Format = Literal[("auto", *FORMATS)]

# -- commands ---------------------------------------------------------------------------


def assemble(
    public: str,
    experts: list[str],
    out: str,
    format: Format = DEFAULT_FORMAT,
    top_k: int | None = None,
    normalize: bool = False,
    spec_sha256: str | None = None,
    allow_approximate: bool = False,
    public_data: list[str] | None = None,
    routing: Literal["auto", "posterior", "lda", "published"] = "auto",
    spec: str | None = None,
    seq_len: int | None = None,
) -> None:
    """Merge owners' expert artifacts with the public model into one MoE (FlexOlmo step 3).

    Every artifact is validated (fingerprint of the public model, shapes, dtypes, finite
    values; never unpickled) before any weight is merged. The same pipeline as the coordinator's
    (:func:`flexmoe.assembly.merge_experts`): assemble, route, fold the router biases for a
    transformers format, write.

    Args:
        public: Directory of the dense public model (``save_pretrained`` output).
        experts: Expert artifacts (``.safetensors``), one per owner, in expert order.
        out: Output directory.
        format: ``flexolmo`` (OLMo-2 bases), ``mixtral`` (Llama/Mistral bases), ``native``
            (any base, reopened with ``flexmoe.load``), or ``auto``: the base's transformers
            format when it holds the model exactly, else native.
        top_k: Experts per token at inference (default: all).
        normalize: Renormalise the top-k router weights (Mixtral); FlexOlmo does not.
        spec_sha256: Reject artifacts not trained under this FederationSpec hash.
        allow_approximate: Export to a named transformers format even where it cannot represent
            the model exactly (e.g. non-zero router biases in FlexOlmo).
        public_data: Public text (files, folders, globs, JSONL) for the routing recipe's public
            statistics.
        routing: ``posterior``: route by the domain the prefix is in, from the owners' token
            counts and the public data's (from ``--spec``'s public-statistics file, else counted
            in ``--public-data``), each owner's expert mixed with the public one by its own trained
            router; native format only: with ``--format flexolmo``/``mixtral`` the export carries
            the recipe's token router (``lda``) instead, and says so. ``lda``: the token router,
            the discriminant built from the statistics the owners shipped (docs/routing.md; needs
            ``--public-data``). ``published``: FlexOlmo's merge as published (the owners' router
            rows stacked). ``auto``: the spec's recipe with ``--spec``, else ``posterior`` when
            ``--public-data`` is given, else ``published``. A recipe that needs statistics some
            owner did not ship is an error naming those owners. For FlexOlmo and Mixtral outputs
            the discriminant's biases are folded into the rows so the export is exact; the native
            format keeps them.
        spec: FederationSpec JSON the experts were trained under: checks their spec hash and
            supplies the public router row r_pub, the routing recipe and the row length.
        seq_len: Tokens per packed row of public text for the routing statistics, without
            ``--spec`` (with it, the spec's ``expert.seq_len``); default ``flexmoe.spec.DEFAULT_SEQ_LEN``.
    """
    loaded = FederationSpec.load(spec) if spec else None
    if routing != "auto":
        method = routing
    elif loaded is not None:
        method = None  # the spec's recipe
    else:
        method = "posterior" if public_data else "published"
    merged = merge_experts(
        public,
        list(experts),
        spec=loaded,
        spec_path=spec,
        routing=method,
        public_documents=read_documents(public_data) if public_data else None,
        seq_len=seq_len,
        format=format,
        top_k=top_k,
        normalize=normalize,
        spec_sha256=spec_sha256,
        out=out,
        allow_approximate=allow_approximate,
        stream=True,  # the published merge goes to disk one artifact tensor at a time
    )
    router = merged.routing.get("router", merged.routing["method"])
    fmt = detect_format(out)
    print(f"flexmoe: assembled {len(experts)} expert(s) with {public} -> {out} (routing: {router}, {fmt})")
    if "note" in merged.routing:
        print(f"flexmoe: note: {merged.routing['note']}; use --format native for the posterior router")


def export(
    model: str,
    out: str,
    format: Format = DEFAULT_FORMAT,
    allow_approximate: bool = False,
    evaluation: str | None = None,
) -> None:
    """Re-export a flexmoe model directory (native, FlexOlmo or Mixtral) in another format, with
    its model card (``README.md``) regenerated from the provenance it carries.

    Args:
        model: Model directory written by flexmoe, or a transformers FlexOlmo/Mixtral checkpoint.
        out: Output directory.
        format: ``flexolmo``, ``mixtral``, ``native`` or ``auto`` (the base's transformers format
            when it holds the model exactly, else native).
        allow_approximate: Export even where the format cannot represent the model exactly.
        evaluation: ``flexmoe eval --json`` output for this model: its table goes into the model
            card (and is dropped again when an expert is added or opted out).
    """
    moe = load(model)
    if evaluation is not None:
        path = Path(evaluation)
        table = evaluation_from_result(read_json(path.parent, path.name), source=path.name)
        settings(moe).provenance.evaluation = table
    export_model(moe, out, format=format, allow_approximate=allow_approximate, tokenizer=model)
    print(f"flexmoe: exported {model} -> {out} ({format})")


def add_expert(
    model: str,
    expert: str,
    out: str,
    format: Format | None = None,
    top_k: int | None = None,
    allow_approximate: bool = False,
) -> None:
    """Opt in: append one owner's expert artifact to a merged model, retraining nobody.

    Args:
        model: Merged model directory (flexmoe native, FlexOlmo or Mixtral).
        expert: The new owner's expert artifact (``.safetensors``; a LoRA-sized expert is
            materialised). A posterior-routed model needs its token counts (``stats.unigram``,
            and ``stats.bigram`` when the model routes by bigrams).
        out: Output directory.
        format: Output format (default: the format of ``model``).
        top_k: Experts per token from now on (default: keep the model's number, capped at the
            number of experts; a model saved with k = all experts reopens as "all").
        allow_approximate: Export even where the format cannot represent the model exactly.
    """

    def change(moe):
        bounds = HeaderBounds.for_expert(moe.config, bigram_buckets=bigram_buckets(moe))
        artifact = load_expert(expert, moe, fingerprint=fingerprint(moe), bounds=bounds)
        if artifact.owner in settings(moe).owners:
            raise InputError(f"{model} already holds an expert of owner {artifact.owner!r} ({expert})")
        if routes_by_posterior(moe):
            require_token_statistics([artifact], bigram=routes_by_bigram(moe))  # the posterior reads them
        add_to_model(moe, artifact, check_fingerprint=False)

    fmt = _rewrite(model, out, format, top_k, allow_approximate, change)
    print(f"flexmoe: added {expert} to {model} -> {out} ({fmt})")


def opt_out(
    model: str,
    owner: str,
    out: str,
    format: Format | None = None,
    top_k: int | None = None,
    allow_approximate: bool = False,
) -> None:
    """Opt out: remove one owner's expert, router row and bias from a merged model.

    Args:
        model: Merged model directory (flexmoe native, FlexOlmo or Mixtral).
        owner: Name of the owner whose expert is removed.
        out: Output directory.
        format: Output format (default: the format of ``model``).
        top_k: Experts per token from now on (default: keep the model's number, capped at the
            number of experts; a model saved with k = all experts reopens as "all").
        allow_approximate: Export even where the format cannot represent the model exactly.
    """

    def change(moe):
        owners = settings(moe).owners[1:]
        if owner == PUBLIC:
            raise InputError(
                f"the public expert anchors the router and cannot be removed; {model}'s owners are {owners}"
            )
        if owner not in owners:
            raise InputError(f"{model} holds no expert of owner {owner!r}; its owners are {owners}")
        remove_from_model(moe, owner)

    fmt = _rewrite(model, out, format, top_k, allow_approximate, change)
    print(f"flexmoe: removed owner {owner!r} from {model} -> {out} ({fmt})")


def routes_by_posterior(moe) -> bool:
    """Whether a merged model routes by the domain posterior (its routers are PosteriorRouters)."""
    return any(isinstance(b.router, PosteriorRouter) for b in moe_blocks(moe))


def routes_by_bigram(moe) -> bool:
    """Whether a merged model's posterior router also reads bigram counts."""
    return any(isinstance(b.router, PosteriorRouter) and b.router.holds_bigram for b in moe_blocks(moe))


def bigram_buckets(moe) -> int | None:
    """The number of bigram buckets a merged model's posterior router reads, which is all a new
    owner's file may carry of them; ``None`` (any table a recipe allows: an owner ships its spec's
    bigrams whatever the routing) when the model does not route by them."""
    for b in moe_blocks(moe):
        if isinstance(b.router, PosteriorRouter) and b.router.holds_bigram:
            return int(b.router.bigram.shape[1])
    return None


def _rewrite(model, out, format, top_k, allow_approximate, change) -> str:
    """Open a merged model, apply ``change`` to it, and write it (by default in its own format)."""
    fmt = format or detect_format(model)
    moe = load(model)
    change(moe)
    if top_k is not None:
        if not 1 <= top_k <= settings(moe).num_experts:
            raise InputError(f"--top-k must be between 1 and the number of experts ({settings(moe).num_experts})")
        set_top_k(moe, top_k)
    export_model(moe, out, format=fmt, allow_approximate=allow_approximate, tokenizer=model)
    return fmt


def spec(
    public: str,
    out: str,
    public_data: list[str] | None = None,
    embedder: str | None = DEFAULT_EMBEDDER,
    projection_seed: int = 0,
    max_router_docs: int = 1000,
    expert: ExpertRecipe | None = None,
    router_tuning: RouterTuningRecipe | None = None,
    proxy: ProxyBudget | None = None,
    routing: RoutingRecipe | None = None,
) -> None:
    """Write the FederationSpec a coordinator publishes (FlexOlmo step 1).

    Args:
        public: The public model: a local transformers directory or a hub id.
        out: Where to write the spec JSON.
        public_data: Public text (files, folders, globs, JSONL) for the public router row r_pub
            and the public domain's token counts, written next to the spec
            (``<out stem>.public_stats.safetensors``; the spec records its sha256).
        embedder: Sentence-transformers model for router init, or ``null`` for the fallback
            that averages the public model's own hidden states.
        projection_seed: Seed of the embedding-to-model-width projection every owner shares.
        max_router_docs: At most this many documents per router row.
        expert: The owners' training recipe (``--expert.lr``, ``--expert.max_steps``, ...).
        router_tuning: The coordinator's router-tuning recipe.
        proxy: The proxy-set budget.
        routing: How the coordinator sets the merged model's routers, and so what statistics
            owners ship: by default the posterior recipe (``--routing.temperature``,
            ``--routing.smoothing``, ``--routing.reset_at_eos``), whose public counts come from
            ``--public-data``; ``--routing.method lda`` (the token router) or ``published``.
    """
    model = load_public_model(public)
    expert = expert or ExpertRecipe()
    r_pub = public_statistics = None
    if public_data:
        docs = read_documents(public_data)
        tokenizer = AutoTokenizer.from_pretrained(public)
        rows = router_embedding(
            docs,
            model,
            embedder=embedder,
            seed=projection_seed,
            max_docs=max_router_docs,
            tokenizer=tokenizer if embedder is None else None,
        )
        # The embedder gives one row for every layer; the hidden-state fallback one per layer.
        r_pub = rows[0].tolist() if embedder is not None else rows.tolist()
        buckets = (routing or RoutingRecipe()).bigram_buckets
        counts = packed_token_statistics(docs, tokenizer, expert.seq_len, model.config.vocab_size, buckets)
        public_statistics = write_public_statistics(out, counts)
    result = FederationSpec(
        public_model=public,
        fingerprint=fingerprint(model),
        embedder=embedder,
        projection_seed=projection_seed,
        max_router_docs=max_router_docs,
        public_router_embedding=r_pub,
        expert=expert,
        router_tuning=router_tuning or RouterTuningRecipe(),
        proxy=proxy or ProxyBudget(),
        routing=routing or RoutingRecipe(),
        public_statistics=public_statistics,
    )
    result.save(out)
    print(f"flexmoe: wrote spec {out} (sha256 {result.sha256[:16]}..., fingerprint {result.fingerprint[:16]}...)")
    if result.routing.needs_unigram and public_statistics is None:
        print(
            "flexmoe: note: the routing recipe 'posterior' needs the public domain's token counts and this spec "
            "carries none (no --public-data): the merge will need --public-data"
        )


def evaluate(
    model: list[str],
    data: list[str],
    oracle: list[str] | None = None,
    json: str | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> None:
    """Held-out perplexity per domain for one or more models, and the routing of MoEs.

    Args:
        model: Model directories (dense, or any flexmoe format), or ``btm:DIR1,DIR2,...`` for a
            Branch-Train-Merge ensemble; repeat ``--model`` for several.
        data: Held-out domains as ``NAME=PATH`` (file, folder, glob, JSONL or datasets dir).
        oracle: ``DOMAIN=DIR`` per domain: each domain through its own model (routing's bound).
        json: Write the results here as JSON.
        seq_len: Tokens per evaluated row.
        batch_size: Rows per forward pass.
        max_tokens: Evaluate at most this many tokens per domain.
    """
    eval_models(
        model, data, oracle=oracle, json_out=json, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens
    )


def tune_router(
    model: str,
    proxy: list[str],
    public_data: list[str],
    out: str,
    spec: str | None = None,
    recipe: RouterTuningRecipe | None = None,
    format: Format | None = None,
    allow_approximate: bool = False,
) -> None:
    """Tune a merged model's routers on the owners' proxy sets and the public data (FlexOlmo step 4).

    Only router rows (and biases, with ``--recipe.train_bias true``) move; experts stay frozen.

    Args:
        model: Merged model directory (flexmoe native, FlexOlmo or Mixtral).
        proxy: ``OWNER=PATH`` per owner: a ``.proxy.json`` selection (document ids into
            ``--public-data``) as owners write it, or text (file, folder, glob, JSONL).
        public_data: The public text the proxy selections index (files, folders, globs, JSONL).
        out: Output directory.
        spec: Take the router-tuning recipe from this FederationSpec JSON.
        recipe: The recipe (``--recipe.max_steps``, ``--recipe.lr``, ...); overrides ``--spec``.
        format: Output format (default: the format of ``model``).
        allow_approximate: Export even where the format cannot represent the model exactly.
    """
    from flexmoe.training.router_tuning import tune_router as tune  # Lightning: only this command needs it

    public_docs = read_documents(public_data)
    proxies = {}
    for owner, path in parse_domains(proxy, "--proxy").items():
        if path.endswith(".json"):
            proxies[owner] = ProxySelection.from_json(Path(path).read_text()).texts(public_docs)
        else:
            proxies[owner] = read_documents(path)
    if recipe is None:
        recipe = FederationSpec.load(spec).router_tuning if spec else RouterTuningRecipe()

    def change(moe):
        summary = tune(moe, proxy_documents=proxies, public_documents=public_docs, tokenizer=model, recipe=recipe)
        settings(moe).provenance.evaluation = None  # it scored the routers before tuning
        print(
            f"flexmoe: router tuning {summary['steps']} steps, loss {summary['loss_first']:.3f} -> "
            f"{summary['loss_last']:.3f}"
        )

    fmt = _rewrite(model, out, format, None, allow_approximate, change)
    print(f"flexmoe: tuned the routers of {model} -> {out} ({fmt})")


def merge(recipe: str, out: str) -> None:
    """Merge dense models as a YAML recipe says (soup, task arithmetic, TIES, DARE), into a new
    transformers directory: ``flexmoe merge RECIPE.yaml --out DIR``. The recipe is validated
    before any weight is read.

    Args:
        recipe: The merge recipe (YAML): method, base, models and the method's parameters.
        out: Output directory (must not exist yet, or be empty).
    """
    print(f"flexmoe: merged -> {merge_recipe(recipe, out)}")


# -- helpers ----------------------------------------------------------------------------
