"""Provenance: who contributed each expert of a merged model, what they shared, and what happened since.

A merged model carries one :class:`Provenance` in its :class:`~flexmoe.core.moe.MoESettings`, so
it travels with the model: :func:`~flexmoe.core.surgery.add_expert` records the new owner's
:class:`ExpertProvenance` (from its artifact), :func:`~flexmoe.core.surgery.opt_out` drops that
owner's record, every export writes it into ``flexmoe_config.json`` (key ``"provenance"``) and
renders the model card from it (:mod:`flexmoe.formats.model_card`), and :func:`flexmoe.load` reads
it back. A card is therefore regenerated from the model, never patched.

Every value comes from another party (an owner's artifact metadata, a model directory's JSON),
so a record holds only bounded, printable, one-line text (:func:`clean_text`) and counts, and
:meth:`Provenance.from_json` refuses anything else. Escaping for YAML and markdown is the card's
job; this module guarantees it is given short printable strings.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flexmoe.core.errors import InputError
from flexmoe.core.parsing import parse_count, shorten

# What an expert artifact can carry, by part: a short label and what it reveals, in the words the
# card and `flexmoe inspect` use. Keys are what a record stores, so a record never holds free text
# about what was shared.
SHARED: dict[str, tuple[str, str]] = {
    "expert_mlp": ("expert MLP weights", "trained on the owner's text; an expert can memorise it"),
    "expert_lora": ("expert LoRA factors", "a low-rank update of the public MLP, trained on the owner's text"),
    "router_row": ("router row and bias", "r_j and b_j: what the owner's text looks like to the router"),
    "mlp_input_mean": ("MLP-input mean", "per layer, the mean MLP input on the owner's text (routing statistics)"),
    "mlp_input_covariance": ("MLP-input covariance", "per layer, the covariance of those inputs (routing statistics)"),
    "unigram_counts": ("unigram counts", "how often each token of the vocabulary occurs in the owner's training text"),
    "bigram_counts": ("bigram counts", "how often adjacent token pairs occur in that text, hashed into buckets"),
}
_PARTS = (
    (re.compile(r"layers\.[0-9]+\.expert\..+\.lora_[AB]"), "expert_lora"),
    (re.compile(r"layers\.[0-9]+\.expert\..+"), "expert_mlp"),
    (re.compile(r"layers\.[0-9]+\.router\.(embedding|bias)"), "router_row"),
    (re.compile(r"layers\.[0-9]+\.stats\.mean"), "mlp_input_mean"),
    (re.compile(r"layers\.[0-9]+\.stats\.covariance"), "mlp_input_covariance"),
    (re.compile(r"stats\.unigram"), "unigram_counts"),
    (re.compile(r"stats\.bigram"), "bigram_counts"),
)
# The public row r_0 an owner echoes back is the spec's, not the owner's: it reveals nothing.
PUBLIC_ROW = re.compile(r"layers\.[0-9]+\.router\.public_embedding")

TEXT_CHARS = 128  # a metadata string in a record: a hash, an epsilon, a LoRA note
MAX_HISTORY = 10_000
MAX_ROUTING_KEYS = 64
MAX_EVALUATION_ROWS = 256
MAX_EVALUATION_COLUMNS = 64
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COUNT_MAX = 2**53  # exact in float64, as the artifact's own counts (flexmoe.artifacts.expert.MAX_TOKENS)
_COUNTS = ("training_tokens", "stats_tokens", "unigram_tokens", "bigram_pairs")
_TEXTS = ("fingerprint", "spec_sha256", "dp_epsilon", "dp_delta", "dp_accountant", "dp_covers", "materialized_from")
EVENTS = ("added", "opted out")


def shared_parts(names: Iterable[str]) -> list[str]:
    """The :data:`SHARED` parts that artifact tensors named ``names`` hold, in :data:`SHARED`'s order
    (a name matching none, like the public row, adds nothing)."""
    found = set()
    for name in names:
        part = next((p for pattern, p in _PARTS if pattern.fullmatch(name)), None)
        if part is not None:
            found.add(part)
    return [p for p in SHARED if p in found]


def clean_text(value, limit: int = TEXT_CHARS) -> str | None:
    """``value`` as text a record may hold: ``None`` stays ``None``; anything else becomes one
    printable line (each unprintable character written as its ``\\x..``/``\\u..`` escape, outer
    spaces removed) of at most ``limit`` characters, cut with ``…``; an empty one is ``None``."""
    if value is None:
        return None
    s = value if isinstance(value, str) else repr(value)
    s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s).strip()
    return (s if len(s) <= limit else s[: limit - 1] + "…") or None


def _count(value) -> int | None:
    """A metadata count, or ``None`` where the artifact has none or an unreadable one (the
    artifact loader has already refused those it needs)."""
    try:
        return None if value is None else parse_count(value, what="count", maximum=_COUNT_MAX)
    except InputError:
        return None


@dataclass(frozen=True)
class ExpertProvenance:
    """One owner's record: its name, its artifact's content hash
    (:func:`~flexmoe.core.hashing.content_sha256`, the hash ``flexmoe inspect`` prints), the public
    model fingerprint and spec hash it was trained under, its token counts, its differential-privacy
    record (``dp_epsilon`` at ``dp_delta`` by ``dp_accountant`` over what ``dp_covers`` lists: the
    artifact's metadata as written, ``None`` without DP; flexmoe.training.privacy writes them),
    the :data:`SHARED` parts its artifact carried, and ``materialized_from`` for a LoRA-sized expert."""

    owner: str
    content_sha256: str
    shared: tuple[str, ...] = ()
    fingerprint: str | None = None
    spec_sha256: str | None = None
    training_tokens: int | None = None
    stats_tokens: int | None = None
    unigram_tokens: int | None = None
    bigram_pairs: int | None = None
    dp_epsilon: str | None = None
    dp_delta: str | None = None
    dp_accountant: str | None = None
    dp_covers: str | None = None
    materialized_from: str | None = None

    @classmethod
    def of(
        cls, owner: str, metadata: Mapping[str, str], tensor_names: Iterable[str], content_sha256: str
    ) -> ExpertProvenance:
        """The record of an artifact with ``metadata`` and tensors ``tensor_names`` (whose content
        hash the caller computed), every metadata value bounded by :func:`clean_text`."""
        texts = {k: clean_text(metadata.get(k)) for k in _TEXTS}
        counts = {k: _count(metadata.get(k)) for k in _COUNTS}
        return cls(
            owner=owner, content_sha256=content_sha256, shared=tuple(shared_parts(tensor_names)), **texts, **counts
        )

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["shared"] = list(self.shared)
        return data

    @classmethod
    def from_json(cls, data, where: str) -> ExpertProvenance:
        """A record as :meth:`to_json` wrote it, every field checked; :class:`InputError` naming
        ``where`` and the field otherwise."""
        _object(data, where, {f.name for f in dataclasses.fields(cls)})
        content = data.get("content_sha256")
        if not (isinstance(content, str) and _SHA256.fullmatch(content)):
            raise InputError(f"{where}.content_sha256: expected 64 lowercase hex digits, got {shorten(content, 80)}")
        shared = data.get("shared", [])
        if not (isinstance(shared, list) and all(isinstance(p, str) and p in SHARED for p in shared)):
            raise InputError(f"{where}.shared: expected a list of {', '.join(SHARED)}, got {shorten(shared, 200)}")
        owner = _text(data.get("owner"), f"{where}.owner")
        kwargs = {k: _text_field(data, k, where) for k in _TEXTS}
        for k in _COUNTS:
            v = data.get(k)
            if v is not None and not (type(v) is int and 0 <= v <= _COUNT_MAX):
                raise InputError(f"{where}.{k}: expected null or a count, got {shorten(v, 60)}")
            kwargs[k] = v
        return cls(owner=owner, content_sha256=content, shared=tuple(shared), **kwargs)


@dataclass(frozen=True)
class Evaluation:
    """An evaluation table the card shows: one row per evaluated model, one column per domain
    (``metric``, e.g. held-out perplexity; ``None`` where a row has no value), and where it came from."""

    metric: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, tuple[float | None, ...]], ...]
    source: str | None = None

    def __post_init__(self):
        if len(self.rows) > MAX_EVALUATION_ROWS or len(self.columns) > MAX_EVALUATION_COLUMNS:
            raise InputError(
                f"an evaluation table holds at most {MAX_EVALUATION_ROWS} rows of {MAX_EVALUATION_COLUMNS} columns, "
                f"got {len(self.rows)} of {len(self.columns)}"
            )
        for name, values in self.rows:
            if len(values) != len(self.columns):
                raise InputError(
                    f"evaluation row {shorten(name, 80)}: {len(values)} values for {len(self.columns)} columns"
                )
            for v in values:
                if v is not None and not (type(v) in (int, float) and math.isfinite(v)):
                    raise InputError(
                        f"evaluation row {shorten(name, 80)}: expected finite numbers, got {shorten(v, 60)}"
                    )

    def to_json(self) -> dict:
        rows = [{"model": name, "values": list(values)} for name, values in self.rows]
        return {"metric": self.metric, "columns": list(self.columns), "rows": rows, "source": self.source}

    @classmethod
    def from_json(cls, data, where: str) -> Evaluation:
        _object(data, where, {"metric", "columns", "rows", "source"})
        columns, rows = data.get("columns"), data.get("rows")
        if not isinstance(columns, list) or not isinstance(rows, list):
            raise InputError(f"{where}: expected lists of columns and rows")
        for i, c in enumerate(columns):
            _text(c, f"{where}.columns[{i}]")
        parsed = []
        for i, row in enumerate(rows):
            _object(row, f"{where}.rows[{i}]", {"model", "values"})
            values = row.get("values")
            if not isinstance(values, list):
                raise InputError(f"{where}.rows[{i}].values: expected a list of numbers")
            parsed.append((_text(row.get("model"), f"{where}.rows[{i}].model"), tuple(values)))
        try:
            return cls(
                _text(data.get("metric"), f"{where}.metric"),
                tuple(columns),
                tuple(parsed),
                _text_field(data, "source", where),
            )
        except InputError as e:
            raise InputError(f"{where}: {e}") from None


@dataclass
class Provenance:
    """A merged model's provenance: the record of each owner's expert (by owner, in expert order),
    the history of experts added and opted out, the routing recipe the merge used (its summary:
    short scalar fields), and the evaluation table, dropped whenever an expert comes or goes
    because it described another model."""

    experts: dict[str, ExpertProvenance] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    routing: dict[str, str | int | float | bool] = field(default_factory=dict)
    evaluation: Evaluation | None = None

    def add(self, record: ExpertProvenance) -> None:
        """Record a new owner's expert (:func:`~flexmoe.core.surgery.add_expert`)."""
        self.experts[record.owner] = record
        self._event("added", record.owner, record.content_sha256)

    def opt_out(self, owner: str) -> None:
        """Drop ``owner``'s record (:func:`~flexmoe.core.surgery.opt_out`), keeping in the history
        that it left and which expert (by content hash) left with it."""
        record = self.experts.pop(owner, None)
        self._event("opted out", owner, record.content_sha256 if record is not None else None)

    def _event(self, event: str, owner: str, content_sha256: str | None) -> None:
        self.history.append({"event": event, "owner": owner, "content_sha256": content_sha256})
        del self.history[:-MAX_HISTORY]
        self.evaluation = None

    def set_routing(self, summary: Mapping) -> None:
        """Keep the scalar fields of a merge's routing summary (``method``, the recipe's settings)."""
        routing = {}
        for k, v in list(summary.items())[:MAX_ROUTING_KEYS]:
            key, value = clean_text(k, 64), clean_text(v) if isinstance(v, str) else v
            if key and (isinstance(value, (str, int, bool)) or (isinstance(value, float) and math.isfinite(value))):
                routing[key] = value
        self.routing = routing

    def copy(self) -> Provenance:
        return Provenance(dict(self.experts), [dict(e) for e in self.history], dict(self.routing), self.evaluation)

    def to_json(self) -> dict:
        return {
            "experts": [r.to_json() for r in self.experts.values()],
            "history": [dict(e) for e in self.history],
            "routing": dict(self.routing),
            "evaluation": self.evaluation.to_json() if self.evaluation is not None else None,
        }

    @classmethod
    def from_json(cls, data, owners: list[str], where: str = "provenance") -> Provenance:
        """Provenance as :meth:`to_json` wrote it into a model directory (another party's file),
        for a model whose owner experts are ``owners``: every field checked, at most one record per
        owner of the model and none for an owner it does not hold. :class:`InputError` otherwise."""
        if data is None:
            return cls()
        _object(data, where, {"experts", "history", "routing", "evaluation"})
        experts, history, routing = data.get("experts", []), data.get("history", []), data.get("routing", {})
        if not isinstance(experts, list) or len(experts) > len(owners):
            raise InputError(f"{where}.experts: expected a list of at most {len(owners)} records (one per owner)")
        records = {}
        for i, item in enumerate(experts):
            record = ExpertProvenance.from_json(item, f"{where}.experts[{i}]")
            if record.owner not in owners or record.owner in records:
                raise InputError(
                    f"{where}.experts[{i}].owner: expected one of the model's owners {shorten(owners, 200)}, "
                    f"each once; got {shorten(record.owner, 80)}"
                )
            records[record.owner] = record
        if not isinstance(history, list) or len(history) > MAX_HISTORY:
            raise InputError(f"{where}.history: expected a list of at most {MAX_HISTORY} events")
        events = []
        for i, e in enumerate(history):
            at = f"{where}.history[{i}]"
            _object(e, at, {"event", "owner", "content_sha256"})
            if e.get("event") not in EVENTS:
                raise InputError(f"{at}.event: expected one of {EVENTS}, got {shorten(e.get('event'), 60)}")
            sha = e.get("content_sha256")
            if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
                raise InputError(f"{at}.content_sha256: expected null or 64 lowercase hex digits")
            events.append({"event": e["event"], "owner": _text(e.get("owner"), f"{at}.owner"), "content_sha256": sha})
        if not isinstance(routing, dict) or len(routing) > MAX_ROUTING_KEYS:
            raise InputError(f"{where}.routing: expected an object of at most {MAX_ROUTING_KEYS} fields")
        for k, v in routing.items():
            _text(k, f"{where}.routing key", 64)
            if isinstance(v, str):
                _text(v, f"{where}.routing.{k}")
            elif not (isinstance(v, (int, bool)) or (isinstance(v, float) and math.isfinite(v))):
                raise InputError(f"{where}.routing.{k}: expected text, a number or a boolean, got {shorten(v, 60)}")
        evaluation = data.get("evaluation")
        evaluation = None if evaluation is None else Evaluation.from_json(evaluation, f"{where}.evaluation")
        ordered = {o: records[o] for o in owners if o in records}  # expert order
        return cls(ordered, events, dict(routing), evaluation)


def _object(data, where: str, keys: set[str]) -> None:
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(data).__name__}")
    extra = sorted(set(data) - keys)
    if extra:
        raise InputError(f"{where}: unknown fields {shorten(extra, 200)}; expected some of {sorted(keys)}")


def _text(value, where: str, limit: int = TEXT_CHARS) -> str:
    """``value`` if it is text :func:`clean_text` could have written, else an :class:`InputError`."""
    if not (
        isinstance(value, str) and value and len(value) <= limit and value.isprintable() and value.strip() == value
    ):
        raise InputError(f"{where}: expected 1 to {limit} printable characters, got {shorten(value, 80)}")
    return value


def _text_field(data: dict, key: str, where: str) -> str | None:
    value = data.get(key)
    return None if value is None else _text(value, f"{where}.{key}")
