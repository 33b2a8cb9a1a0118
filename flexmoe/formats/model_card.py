"""The model card every export carries: ``README.md`` in the Hugging Face format, rendered from provenance.

:func:`model_card` turns a merged model's :class:`~flexmoe.core.provenance.Provenance` and the
export's ``flexmoe_config.json`` fields into a :class:`huggingface_hub.ModelCard`: a YAML header
(``library_name``, ``tags``, ``pipeline_tag`` and a ``flexmoe`` block holding every record, the
routing recipe, the history and the evaluation as data) and a markdown body saying, for each
owner, the artifact's content hash (what ``flexmoe inspect`` prints for the file the owner sent),
the spec hash, the training tokens, the differential-privacy epsilon (``none`` without DP), what
it shared, and the exact ``flexmoe opt-out`` command that removes it. :func:`write_model_card`
saves it; every export calls it, so ``opt-out`` and ``add-expert``, which re-export, rewrite it
from the records the model carries.

The records hold owners' words (metadata strings, bounded and printable but otherwise
arbitrary), so the body escapes every one of them (:func:`markdown_text`: each ASCII punctuation
character backslash-escaped, which CommonMark defines as literal, so no value can open a link,
an HTML tag, emphasis or a table cell), commands are shell-quoted inside a fence longer than any
backtick run they hold, and the header is written by ``yaml.dump`` (quoted as needed), never by
string formatting.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from flexmoe.core.errors import InputError
from flexmoe.core.provenance import SHARED, Evaluation, ExpertProvenance, Provenance, clean_text

README = "README.md"
_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LOADING = {
    "flexolmo": "`AutoModelForCausalLM.from_pretrained(DIR)` (transformers' `FlexOlmoForCausalLM`)",
    "mixtral": "`AutoModelForCausalLM.from_pretrained(DIR)` (transformers' `MixtralForCausalLM`)",
    "remote": "`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (the modeling code beside it)",
    "native": "`flexmoe.load(DIR)` (flexmoe's native format)",
}


def markdown_text(value) -> str:
    """``value`` as literal markdown text: one printable line (:func:`~flexmoe.core.provenance.clean_text`,
    without a length cut) with every ASCII punctuation character backslash-escaped."""
    text = clean_text(value, limit=2**31) or ""
    return _PUNCTUATION.sub(r"\\\1", text)


def _code_block(lines: list[str]) -> str:
    """A fenced code block whose fence is longer than any backtick run inside it."""
    longest = max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return "\n".join([f"{fence}shell", *lines, fence])


def _hash(value: str | None) -> str:
    if value is None:
        return "unknown"
    return f"`{value}`" if _SHA256.fullmatch(value) else markdown_text(value)


def _privacy(record: ExpertProvenance) -> str:
    """The DP cell: ``none``, or epsilon with its delta, accountant and what it covers."""
    if record.dp_epsilon is None:
        return "none"
    details = [
        f"{label} {markdown_text(value)}"
        for label, value in (("delta", record.dp_delta), ("by", record.dp_accountant), ("over", record.dp_covers))
        if value is not None
    ]
    return markdown_text(record.dp_epsilon) + (f" ({', '.join(details)})" if details else "")


def _count(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def _shared(record: ExpertProvenance) -> str:
    parts = []
    for part in record.shared:
        words = SHARED[part][0]
        if part == "unigram_counts" and record.unigram_tokens is not None:
            words += f" ({record.unigram_tokens:,} tokens)"
        elif part == "bigram_counts" and record.bigram_pairs is not None:
            words += f" ({record.bigram_pairs:,} pairs)"
        elif part.startswith("mlp_input") and record.stats_tokens is not None:
            words += f" ({record.stats_tokens:,} tokens)"
        parts.append(words)
    if record.materialized_from is not None:
        parts.append(f"sent as {markdown_text(record.materialized_from)}")
    return ", ".join(parts) or "nothing recorded"


def opt_out_command(name: str, owner: str) -> str:
    """The command that removes ``owner`` from the model in directory ``name`` (run beside it)."""
    q = shlex.quote
    return f"flexmoe opt-out --model {q(name)} --owner {q(owner)} --out {q(f'{name}-without-{owner}')}"


def evaluation_from_result(result, source: str | None = None) -> Evaluation:
    """The card's evaluation table from ``flexmoe eval --json``'s result
    (``{"models": {MODEL: {"per_domain": {DOMAIN: ppl}, "average": ppl, ...}}}``): one row per
    model, one column per domain (in the order first seen) and the average, held-out perplexity."""
    models = result.get("models") if isinstance(result, Mapping) else None
    if not isinstance(models, Mapping) or not models:
        raise InputError(
            'an evaluation result: expected {"models": {MODEL: {"per_domain": {...}}}}, as flexmoe eval writes'
        )
    columns: list[str] = []
    for row in models.values():
        domains = row.get("per_domain") if isinstance(row, Mapping) else None
        if not isinstance(domains, Mapping):
            raise InputError("an evaluation result: every model needs its per_domain perplexities")
        columns += [d for d in domains if d not in columns]
    rows = []
    for name, row in models.items():
        values = [row["per_domain"].get(d) for d in columns] + [row.get("average")]
        rows.append((clean_text(name) or "?", tuple(_number(v) for v in values)))
    return Evaluation(
        "held-out perplexity",
        tuple(clean_text(c) or "?" for c in [*columns, "average"]),
        tuple(rows),
        clean_text(source),
    )


def _number(value) -> float | None:
    return float(value) if type(value) in (int, float) else None


def model_card(provenance: Provenance, config: Mapping, name: str) -> ModelCard:
    """The model card of an export: ``config`` is what the export writes into
    ``flexmoe_config.json`` (``format``, ``owners``, ``top_k``, ``normalize``, ``router``,
    ``base_model_type``), ``name`` the directory's name (for the commands it shows)."""
    name = clean_text(name) or "model"
    fmt, owners = config["format"], list(config["owners"])
    records = provenance.experts
    fingerprints = {r.fingerprint for r in records.values() if r.fingerprint is not None}
    shared = {part for r in records.values() for part in r.shared}
    data = ModelCardData(
        library_name="flexmoe" if fmt == "native" else "transformers",
        pipeline_tag="text-generation",
        tags=["flexmoe", "mixture-of-experts", "flexolmo", "federated-learning"],
        flexmoe={
            "format": fmt,
            "base_model_type": config.get("base_model_type"),
            "owners": owners,
            "top_k": config.get("top_k"),
            "router": config.get("router"),
            **provenance.to_json(),
        },
    )
    experts = len(owners)
    k = experts if config.get("top_k") is None else config["top_k"]
    lines = [
        f"# {markdown_text(name)}",
        "",
        f"A mixture of experts merged by flexmoe from {experts - 1} data owners' experts and the public model "
        "(FlexOlmo, Shi et al., 2025, arXiv 2507.07024): expert 0 is the public model's MLP, and each owner's "
        "expert was trained on text that never left the owner's machine. This card is regenerated from the "
        "provenance the model carries (`flexmoe_config.json`, `provenance`) every time the model is exported, "
        "so it lists exactly the experts the model holds.",
        "",
        f"- format: {markdown_text(fmt)}; load with {_LOADING.get(fmt, markdown_text(fmt))}",
        f"- base architecture: {markdown_text(config.get('base_model_type'))}, "
        f"{experts} experts, top-{k} per token{', renormalised' if config.get('normalize') else ''}",
    ]
    if len(fingerprints) == 1:
        lines.append(f"- public model fingerprint: {_hash(fingerprints.pop())}")
    lines += [
        "",
        "## Experts",
        "",
        "| # | owner | artifact content sha256 | spec sha256 | training tokens | DP epsilon | shared |",
        "|---|---|---|---|---|---|---|",
        "| 0 | public | (the public model) | | | | |",
    ]
    for j, owner in enumerate(owners[1:], start=1):
        r = records.get(owner)
        if r is None:
            lines.append(f"| {j} | {markdown_text(owner)} | no record | | | | |")
            continue
        dp = _privacy(r)
        lines.append(
            f"| {j} | {markdown_text(owner)} | {_hash(r.content_sha256)} | {_hash(r.spec_sha256)} | "
            f"{_count(r.training_tokens)} | {dp} | {_shared(r)} |"
        )
    if len(records) < experts - 1:
        lines += ["", "An owner with no record came from a checkpoint written without provenance."]
    if len(fingerprints) > 1:
        lines += ["", "The experts name different public models:"]
        lines += [f"- {markdown_text(o)}: {_hash(r.fingerprint)}" for o, r in records.items()]
    lines += [
        "",
        "The content sha256 is over the artifact's tensors and metadata (`flexmoe.core.hashing.content_sha256`); "
        "`flexmoe inspect FILE` prints it for the file an owner sent. What the shared parts are:",
        "",
        *[f"- {label}: {words}" for part, (label, words) in SHARED.items() if part in shared],
        "",
        "## Routing",
        "",
        f"- router: {markdown_text(config.get('router'))}",
    ]
    lines += [f"- {markdown_text(key)}: {markdown_text(value)}" for key, value in provenance.routing.items()]
    lines += ["", "## Evaluation", ""]
    lines += _evaluation(provenance.evaluation)
    if provenance.history:
        lines += ["", "## History", ""]
        for e in provenance.history:
            sha = f" (content sha256 {_hash(e['content_sha256'])})" if e["content_sha256"] else ""
            lines.append(f"1. {e['event']}: {markdown_text(e['owner'])}{sha}")
    lines += [
        "",
        "## Opting out",
        "",
        "Any owner can leave without anyone retraining: `flexmoe opt-out` removes its expert, router row and "
        "bias from every layer, and its record from this card, and the rest of the model is exactly what it "
        "would have been had that owner never joined (FlexOlmo section 3.3). From the directory that holds "
        "this model:",
        "",
    ]
    if experts > 1:
        lines.append(_code_block([opt_out_command(name, o) for o in owners[1:]]))
    else:
        lines.append("(no owner expert to remove)")
    lines += [
        "",
        "A new owner joins the same way, its validated artifact appended and nobody retrained:",
        "",
        _code_block([f"flexmoe add-expert --model {shlex.quote(name)} --expert OWNER.safetensors --out NEW_DIR"]),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n")


def _evaluation(evaluation: Evaluation | None) -> list[str]:
    if evaluation is None:
        return [
            "No evaluation recorded for this model (adding or opting out an expert drops the previous one, "
            "which described another model). `flexmoe eval --model DIR --data DOMAIN=PATH --json eval.json`, then "
            "`flexmoe export --model DIR --evaluation eval.json --out NEW_DIR` records one."
        ]
    source = f" (from {markdown_text(evaluation.source)})" if evaluation.source else ""
    lines = [
        f"{markdown_text(evaluation.metric)}{source}:",
        "",
        "| model | " + " | ".join(markdown_text(c) for c in evaluation.columns) + " |",
        "|---|" + "---|" * len(evaluation.columns),
    ]
    for model, values in evaluation.rows:
        cells = ["" if v is None else f"{v:.4g}" for v in values]
        lines.append(f"| {markdown_text(model)} | " + " | ".join(cells) + " |")
    return lines


def write_model_card(directory: str | Path, provenance: Provenance, config: Mapping, name: str) -> Path:
    """Write :func:`model_card` to ``directory/README.md``; returns its path."""
    path = Path(directory) / README
    model_card(provenance, config, name).save(path)
    return path
