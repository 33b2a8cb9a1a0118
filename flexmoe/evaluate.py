"""The evaluation table (FlexOlmo Table 1; docs/demo.md): per-domain
held-out perplexity of each model, its averages, throughput, and where an MoE routes.

A domain's documents are tokenised and packed exactly as :class:`~flexmoe.data.datamodule.TextDataModule`
packs them (each document followed by EOS, the stream cut into rows of ``seq_len``, the final
partial row dropped), so a domain's perplexity here is ``exp`` of the validation loss an owner
sees on the same text. Perplexity is ``exp`` of the mean next-token NLL over every predicted
token of every row (``seq_len - 1`` per row), i.e. ``exp`` of what ``transformers`` reports as
``loss`` with ``labels=input_ids`` on those rows.

Models are given as strings: a dense ``transformers`` directory, any format :func:`flexmoe.load`
opens, or ``btm:DIR1,DIR2,...`` for a :class:`~flexmoe.merge.BTMEnsemble` of those
directories, in the paper's default configuration (top-3 domains per position); the table has no
held-out text besides what it scores, so its cached prior stays at its uniform start. ``oracle``
routing (each domain through its own model) is the bound on routing.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from flexmoe.core.errors import InputError
from flexmoe.core.io import atomic_write_json
from flexmoe.core.moe import record_router_logits
from flexmoe.core.surgery import is_moe, settings
from flexmoe.data.packing import Documents, pack_domain, tokenizer_hash
from flexmoe.formats.export import tokenizer_files
from flexmoe.formats.load import load
from flexmoe.merge import BTMEnsemble

BTM_PREFIX = "btm:"
ORACLE = "oracle"


# -- data ------------------------------------------------------------------------------------


# -- one model -------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _routes(model: nn.Module) -> bool:
    """Whether to report routing: a flexmoe MoE (a BTM ensemble of MoEs holds several)."""
    return not isinstance(model, BTMEnsemble) and is_moe(model)


def _summary(per_domain: dict[str, float]) -> dict[str, float]:
    values = list(per_domain.values())
    return {
        "average": sum(values) / len(values),
        "geometric_average": math.exp(sum(math.log(v) for v in values) / len(values)),
    }


@torch.inference_mode()
def domain_nll(model: nn.Module, rows: torch.Tensor, *, batch_size: int = 8, desc: str | None = None) -> dict:
    """Sum of next-token NLL over ``rows`` ``[N, S]`` and what was counted.

    Returns ``{"nll_sum", "predicted_tokens", "input_tokens", "seconds"}`` and, for a flexmoe
    MoE, ``"top1_counts"``: ``[layers, experts]`` how often each expert was a token's top-1.
    ``seconds`` is the time spent in forward passes only.
    """
    device = _device_of(model)
    routes = _routes(model)
    nll, seconds, counts = 0.0, 0.0, None
    with tqdm(total=rows.shape[0], desc=desc, unit="seq", leave=False, disable=None, file=sys.stderr) as bar:
        for start in range(0, rows.shape[0], batch_size):
            batch = rows[start : start + batch_size].to(device)
            t0 = time.perf_counter()
            if routes:
                with record_router_logits(model) as router_logits:
                    out = model(input_ids=batch, use_cache=False)
                top1 = torch.stack([layer.argmax(-1) for layer in router_logits])  # [layers, tokens]
                num_experts = settings(model).num_experts
                c = F.one_hot(top1, num_experts).sum(1)
                counts = c if counts is None else counts + c
            else:
                out = model(input_ids=batch, use_cache=False)
            logits = out.logits[:, :-1].float()
            nll += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
            seconds += time.perf_counter() - t0  # float() above waited for the device
            bar.update(batch.shape[0])
    n, s = rows.shape
    result = {"nll_sum": nll, "predicted_tokens": n * (s - 1), "input_tokens": n * s, "seconds": seconds}
    if counts is not None:
        result["top1_counts"] = counts.cpu()
    return result


def perplexity(
    model: nn.Module,
    domains: Mapping[str, Documents],
    tokenizer=None,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    *,
    name: str = "",
) -> dict:
    """Per-domain held-out perplexity of ``model`` (one column set of the evaluation table).

    ``domains`` maps a name to that domain's documents (see :func:`pack_domain`; the tokenizer
    is needed unless they are packed rows already). Returns::

        {"per_domain": {domain: ppl}, "average": mean ppl, "geometric_average": ppl,
         "tokens_per_s": input tokens per second of forward passes,
         "routing": {domain: {"layer0": {owner: top-1 share}}}}    # flexmoe MoEs only
    """
    if not domains:
        raise ValueError("no domains to evaluate")
    was_training = model.training
    model.eval()
    per_domain, routing, tokens, seconds = {}, {}, 0, 0.0
    try:
        for domain, docs in domains.items():
            rows = pack_domain(docs, tokenizer, seq_len, max_tokens)
            r = domain_nll(model, rows, batch_size=batch_size, desc=f"{name or 'model'} | {domain}")
            per_domain[domain] = math.exp(r["nll_sum"] / r["predicted_tokens"])
            tokens, seconds = tokens + r["input_tokens"], seconds + r["seconds"]
            if "top1_counts" in r:
                owners = settings(model).owners
                share = r["top1_counts"].double() / r["top1_counts"].sum(-1, keepdim=True)
                routing[domain] = {f"layer{L}": dict(zip(owners, row.tolist())) for L, row in enumerate(share)}
    finally:
        model.train(was_training)
    result = {"per_domain": per_domain, **_summary(per_domain), "tokens_per_s": tokens / max(seconds, 1e-9)}
    if routing:
        result["routing"] = routing
    return result


def oracle_perplexity(
    models: Mapping[str, str | nn.Module],
    domains: Mapping[str, Documents],
    tokenizer=None,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> dict:
    """Oracle routing: every domain evaluated with its own model (``models[domain]``, a model
    or a model string as in :func:`open_model`), summarised like :func:`perplexity`."""
    missing = [d for d in domains if d not in models]
    extra = [d for d in models if d not in domains]
    if missing or extra:
        raise ValueError(
            f"oracle routing needs exactly one model per domain: domains without one {missing}, "
            f"models for unknown domains {extra} (domains: {list(domains)})"
        )
    per_domain, tokens, seconds = {}, 0, 0.0
    for domain, docs in domains.items():
        model = models[domain]
        model = open_model(model) if isinstance(model, str) else model.eval()
        rows = pack_domain(docs, tokenizer, seq_len, max_tokens)
        r = domain_nll(model, rows, batch_size=batch_size, desc=f"{ORACLE} | {domain}")
        per_domain[domain] = math.exp(r["nll_sum"] / r["predicted_tokens"])
        tokens, seconds = tokens + r["input_tokens"], seconds + r["seconds"]
        del model
    return {"per_domain": per_domain, **_summary(per_domain), "tokens_per_s": tokens / max(seconds, 1e-9)}


# -- model strings ---------------------------------------------------------------------------


def model_dirs(spec: str) -> list[str]:
    """The directories a model string names (one, or a BTM ensemble's members)."""
    if spec.startswith(BTM_PREFIX):
        dirs = [d.strip() for d in spec[len(BTM_PREFIX) :].split(",") if d.strip()]
        if not dirs:
            raise ValueError(f"{spec!r} names no models; write btm:DIR1,DIR2,...")
        return dirs
    return [spec]


def open_model(spec: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A model string -> the model, in eval mode: a dense ``transformers`` directory, any
    format :func:`flexmoe.load` opens, or ``btm:DIR1,DIR2,...`` (a :class:`BTMEnsemble`)."""
    for d in model_dirs(spec):
        if not Path(d).is_dir():
            raise FileNotFoundError(f"model directory {d!r} (from {spec!r}) does not exist")
    if spec.startswith(BTM_PREFIX):
        model = BTMEnsemble.from_dirs(model_dirs(spec), dtype=dtype)
    else:
        model = load(spec, dtype=dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def _config_vocab_size(directory: str) -> int | None:
    """The vocabulary size a model directory's config declares, read without the weights."""
    for name in ("base_config.json", "config.json"):  # a native export keeps its config in the first
        path = Path(directory) / name
        if path.is_file():
            config = json.loads(path.read_text())
            return config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return None


def _has_tokenizer(directory: str) -> bool:
    return bool(tokenizer_files(directory))


def _shared_tokenizer(dirs: list[str], tokenizer: str | None):
    """The tokenizer every model is evaluated with; refuses models that disagree on it."""
    with_tok = [d for d in dirs if _has_tokenizer(d)]
    source = tokenizer or (with_tok[0] if with_tok else None)
    if source is None:
        raise ValueError(f"none of the model directories {dirs} holds a tokenizer; pass tokenizer=DIR")
    tok = AutoTokenizer.from_pretrained(source)
    reference = tokenizer_hash(tok)
    for d in with_tok:
        if d != source and tokenizer_hash(AutoTokenizer.from_pretrained(d)) != reference:
            raise ValueError(
                f"the tokenizer in {d} differs from the one in {source}; "
                "every model in one table must share the tokenizer"
            )
    sizes = {d: _config_vocab_size(d) for d in dirs}
    known = {d: v for d, v in sizes.items() if v is not None}
    if len(set(known.values())) > 1:
        listed = ", ".join(f"{d}: {v}" for d, v in known.items())
        raise ValueError(
            f"the models do not share a vocabulary (vocab_size {listed}); "
            "every model in one table must use the same tokenizer"
        )
    for d, v in known.items():
        if len(tok) > v:
            raise ValueError(f"the tokenizer from {source} has {len(tok)} tokens but {d} has vocab_size {v}")
    return tok


def parse_domains(data: Sequence[str], what: str = "--data") -> dict[str, str]:
    """``["NAME=PATH", ...]`` -> ``{NAME: PATH}`` (names unique, in the order given)."""
    out: dict[str, str] = {}
    for item in data:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise InputError(f"{what} expects NAME=PATH, got {item!r}")
        if name in out:
            raise InputError(f"{what} names domain {name!r} twice")
        out[name] = path
    return out


# -- the table -------------------------------------------------------------------------------


def eval_models(
    models: list[str],
    data: list[str],
    oracle: list[str] | None = None,
    json_out: str | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    tokenizer: str | None = None,
) -> dict:
    """The evaluation table: per-domain held-out perplexity of every model.

    Args:
        models: model strings (a dense ``transformers`` directory, any flexmoe format, or
            ``btm:DIR1,DIR2,...``), each a row; they must share the tokenizer.
        data: ``NAME=PATH`` per domain; PATH is held-out text in any form
            :class:`~flexmoe.data.datamodule.TextDataModule` reads, and all of it is evaluated.
        oracle: ``DOMAIN=DIR`` per domain, reported as the row ``"oracle"`` (each domain
            through its own model: the bound on routing).
        json_out: where to write the result as JSON.
        seq_len, batch_size: rows of ``seq_len`` tokens, ``batch_size`` rows per forward pass.
        max_tokens: evaluate at most this many tokens per domain (whole rows, at least one).
        tokenizer: a tokenizer directory; default: the first model directory holding one.

    Returns (and writes)::

        {"models": {MODEL: {"per_domain": {DOMAIN: ppl}, "average": ppl,
                            "geometric_average": ppl, "tokens_per_s": float,
                            "routing": {DOMAIN: {"layer0": {OWNER: share}}}}}}   # MoEs only

    with ``MODEL`` each string as given, plus ``"oracle"``. Also prints the table.
    """
    if not models and not oracle:
        raise ValueError("nothing to evaluate: give at least one model (or oracle models)")
    if len(set(models)) != len(models):
        raise ValueError(f"a model is given twice: {models}")
    if oracle and ORACLE in models:
        raise ValueError(f"a model named {ORACLE!r} would clash with the oracle row")
    domains = parse_domains(data)
    if not domains:
        raise ValueError("no domains: give --data NAME=PATH at least once")
    oracle_dirs = parse_domains(oracle or [], what="--oracle")
    if oracle_dirs and set(oracle_dirs) != set(domains):
        raise ValueError(
            f"--oracle must name one model per --data domain: domains {list(domains)}, "
            f"oracle domains {list(oracle_dirs)}"
        )
    dirs = list(
        dict.fromkeys(
            [d for m in models for d in model_dirs(m)] + [d for o in oracle_dirs.values() for d in model_dirs(o)]
        )
    )
    for d in dirs:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"model directory {d!r} does not exist")
    tok = _shared_tokenizer(dirs, tokenizer)
    # Tokenise each domain once for every model.
    packed = {name: pack_domain(path, tok, seq_len, max_tokens) for name, path in domains.items()}
    rows: dict[str, dict] = {}
    for spec in models:
        model = open_model(spec)
        rows[spec] = perplexity(model, packed, seq_len=seq_len, batch_size=batch_size, name=spec)
        del model
    if oracle_dirs:
        rows[ORACLE] = oracle_perplexity(oracle_dirs, packed, seq_len=seq_len, batch_size=batch_size)
    result = {"models": rows}
    if json_out:
        atomic_write_json(json_out, result)
    print(format_table(result, {name: int(r.numel()) for name, r in packed.items()}))
    return result


def format_table(result: dict, tokens: Mapping[str, int] | None = None) -> str:
    """A plain-text rendering of :func:`eval_models`' result (perplexity; routing for MoEs)."""
    rows = result["models"]
    if not rows:
        return ""
    domains = list(next(iter(rows.values()))["per_domain"])
    head = ["model", *domains, "average", "geo. avg", "tok/s"]
    body = [
        [
            name,
            *(f"{r['per_domain'][d]:.2f}" for d in domains),
            f"{r['average']:.2f}",
            f"{r['geometric_average']:.2f}",
            f"{r['tokens_per_s']:.0f}",
        ]
        for name, r in rows.items()
    ]
    lines = [
        "held-out perplexity"
        + (" (" + ", ".join(f"{d}: {n} tokens" for d, n in tokens.items()) + ")" if tokens else "")
    ]
    lines += _grid(head, body)
    for name, r in rows.items():
        if "routing" not in r:
            continue
        owners = list(next(iter(next(iter(r["routing"].values())).values())))
        lines += ["", f"{name}: top-1 routing share, mean over layers"]
        table = []
        for d, layers in r["routing"].items():
            mean = [sum(shares[o] for shares in layers.values()) / len(layers) for o in owners]
            table.append([d, *(f"{m:.2f}" for m in mean)])
        lines += _grid(["domain", *owners], table)
    return "\n".join(lines)


def _grid(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]

    def line(row):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [line(head), "  ".join("-" * w for w in widths), *(line(r) for r in body)]
