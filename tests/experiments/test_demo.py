"""`flexmoe demo`: the whole FlexOlmo flow and every comparison method, end to end.

One run of the command (the `--fast` preset, made smaller still through `--settings.*`) feeds
the tests below: the owners and the coordinator run as real Flower apps on the simulation
engine, every model is really trained, and the report is checked against the files it names.
The other tests check the report's wording and the config rules without training anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from flexmoe.experiments.demo import OWNERS, DemoConfig, findings, markdown_table
from flexmoe.experiments.report import BTM_TARGET

# The --fast preset itself, so the ordering tests check what that preset promises (about two
# minutes on a loaded 2-core machine, a third of it Ray starting the simulated owners). One
# --settings override that leaves the numbers alone exercises the command line's override path.
OVERRIDES = {"eval_batch_size": 16}
FAST = dataclasses.replace(DemoConfig.fast(), **OVERRIDES)
DOMAINS = ["public", *OWNERS]
# flexolmo's average must be below MARGIN x each rival's average that the demo promises. Measured
# on --fast (2026-12-07, bigram statistics): at most 0.958x (against flexolmo_token), and 0.991x
# btm; the margin leaves room for noise, not for a regression.
MARGIN = 0.98
METHOD_KEYS = [
    "public",
    *(f"expert:{o}" for o in OWNERS),
    "soup",
    "weighted_soup",
    "btm",
    "btm_top3_ema",
    "btx",
    "flexolmo_no_rt",
    "flexolmo_token",
    "flexolmo_published",
    "flexolmo",
    "unrestricted",
    "oracle",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`flexmoe demo --out DIR --fast --settings.X ...` through the real command line."""
    from flexmoe.cli import main

    out = tmp_path_factory.mktemp("demo") / "out"
    argv = ["demo", "--out", str(out), "--fast", "--threads", "1"]
    for name, value in OVERRIDES.items():
        argv += [f"--settings.{name}", str(value)]
    main(argv)
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_report_json_has_every_method_and_domain(run):
    _, report = run
    assert set(report) == {"methods", "settings", "wall_times"}
    assert list(report["methods"]) == METHOD_KEYS
    for key, row in report["methods"].items():
        assert set(row) == {"per_domain", "average"}, key
        assert list(row["per_domain"]) == DOMAINS, key
        values = list(row["per_domain"].values())
        assert all(math.isfinite(v) and v > 1 for v in values), (key, values)
        assert row["average"] == pytest.approx(sum(values) / len(values)), key


@pytest.mark.slow
def test_settings_are_the_fast_preset_with_the_overrides_and_the_documented_recipe(run):
    _, report = run
    s = report["settings"]
    assert s["config"] == dataclasses.asdict(FAST)
    assert s["fast"] is True and s["threads"] == 1
    assert s["embedder"] is None  # the no-embedder fallback
    assert s["routing"]["method"] == "lda" and s["flexolmo"]["routing"]["folded"] is True
    assert s["router_tuning"]["enabled"] is True and s["router_tuning"]["data"] == "owners"
    tuning = s["flexolmo"]["router_tuning"]  # federated: Flower rounds with every owner in each
    rounds, steps = FAST.router_tuning_rounds, FAST.router_tuning_steps
    assert tuning["data"] == "owners" and tuning["steps"] == steps and tuning["local_steps"] == steps // rounds
    assert [r["owners"] for r in tuning["rounds"]] == [sorted(OWNERS)] * rounds
    for name in ("proxy_router_tuning", "btx_pooled_data"):  # FlexOlmo's proxy tuning; BTX on pooled data
        assert set(s["flexolmo"]["diagnostics"][name]["per_domain"]) == set(DOMAINS), name
    assert s["flexolmo"]["coordinator_routing"]["method"] == "lda"  # the coordinator routed, tuned, exported
    posterior = s["flexolmo"]["posterior"]  # the flexolmo row: the default recipe, routed by the posterior
    assert posterior["method"] == "posterior" and posterior["router_kind"] == ["posterior"]
    ema = s["btm_top3_ema"]
    assert ema["top_k"] == 3 and set(ema["fitted_prior"]) == set(DOMAINS)
    assert all(n > 0 for n in ema["prior_rows"].values()) and set(ema["prior_rows_from"]) == set(DOMAINS)
    for domain, prior in ema["fitted_prior"].items():
        assert len(prior) == len(DOMAINS) and sum(prior) == pytest.approx(1.0, abs=1e-3), domain
    assert set(s["flexolmo"]["diagnostics"]["lda_with_biases"]["per_domain"]) == set(DOMAINS)
    assert s["federation"]["status"] == "merged" and s["federation"]["accepted"] == list(OWNERS)
    times = report["wall_times"]
    for stage in ("data", "pretrain", "federation", "btx", "unrestricted", "router_tuning", "total"):
        assert times[stage] > 0, stage
    assert times["total"] >= times["federation"] + times["pretrain"]


@pytest.mark.slow
def test_files_exist_and_the_federation_kept_every_owners_expert(run):
    out, _ = run
    for name in ("report.md", "perplexity.png", "routing.png", "routing.json", "spec.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("perplexity.png", "routing.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    coordinator = out / "federation" / "coordinator"
    for owner in OWNERS:
        assert (coordinator / "artifacts" / f"{owner}.safetensors").is_file(), owner
        assert json.loads((coordinator / "received" / f"{owner}.json").read_text())["proxy"]["indices"], owner
    routing = json.loads((out / "routing.json").read_text())
    shares = routing["flexolmo"]["licenses"]["layer0"]
    assert list(shares) == ["public", *OWNERS] and sum(shares.values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_the_exported_model_is_the_flexolmo_token_row_in_plain_transformers(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexmoe.data.documents import read_documents
    from flexmoe.data.packing import pack_domain, spread_rows
    from flexmoe.evaluate import perplexity

    out, report = run
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert type(model).__name__ == "FlexOlmoForCausalLM"
    assert report["settings"]["export"]["max_abs_logit_diff"] <= 1e-4
    tok = AutoTokenizer.from_pretrained(out / "model")
    cfg = report["settings"]["config"]
    rows = spread_rows(
        pack_domain(read_documents(str(out / "data" / "licenses" / "val.jsonl")), tok, cfg["seq_len"]),
        cfg["eval_tokens"],
    )
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=rows[:2]).logits).all()
    ppl = perplexity(model, {"licenses": rows}, batch_size=cfg["eval_batch_size"])["per_domain"]["licenses"]
    assert ppl == pytest.approx(report["methods"]["flexolmo_token"]["per_domain"]["licenses"], rel=1e-4)


@pytest.mark.slow
def test_a_finished_run_reopens_with_the_same_rows_and_models(run):
    """DemoRun.open (what the benchmarks start from) rebuilds the held-out rows and models the
    report was measured on: an expert row, flexolmo_token (the export) and flexolmo (rebuilt with
    the default recipe, a posterior-routed model) give the report's figures again."""
    from flexmoe.core.surgery import moe_blocks
    from flexmoe.evaluate import perplexity
    from flexmoe.experiments.demo import DemoRun

    out, report = run
    again = DemoRun.open(out)
    assert again.cfg == DemoConfig(**report["settings"]["config"])
    assert list(again.rows) == DOMAINS
    flexolmo = again.flexolmo()
    assert {b.router.kind for b in moe_blocks(flexolmo)} == {"posterior"}
    for name, model in (
        ("flexolmo", flexolmo),
        ("flexolmo_token", again.flexolmo_token()),
        ("expert:licenses", again.models.merged(["licenses"], 2)),
    ):
        r = perplexity(model, again.rows, batch_size=again.cfg.eval_batch_size)
        assert r["average"] == pytest.approx(report["methods"][name]["average"], rel=1e-4), name


def test_read_corpus_splits_the_public_text_into_its_parts_and_refuses_what_does_not_add_up(tmp_path):
    from flexmoe.data.corpus import Domain, write_corpus
    from flexmoe.experiments.demo import PUBLIC, PUBLIC_DOMAINS, read_corpus

    val = {PUBLIC: ["code a", "code b", "topic c"]}
    docs = {
        d: Domain(
            name=d,
            description=d,
            source="test",
            train=[f"{d} train {i}" for i in range(3)],
            val=val.get(d, [f"{d} val {i}" for i in range(2)]),
        )
        for d in (PUBLIC, *OWNERS)
    }
    write_corpus(docs, tmp_path)
    first, second = PUBLIC_DOMAINS
    corpus = read_corpus(tmp_path, {first: 2, second: 1})
    assert corpus["parts"][first].val == ["code a", "code b"] and corpus["parts"][second].val == ["topic c"]
    assert corpus["domains"]["licenses"].train == ["licenses train 0", "licenses train 1", "licenses train 2"]
    with pytest.raises(ValueError, match="holds 3 documents, the report says 4"):
        read_corpus(tmp_path, {first: 2, second: 2})
    with pytest.raises(ValueError, match="parts_val_docs"):
        read_corpus(tmp_path, None)


@pytest.mark.slow
def test_routing_diagnosis_benchmark_runs_on_a_demo_and_its_figures_hold_together(run, tmp_path):
    """benchmarks/routing_diagnosis.py on the run: the right-pair model of public text is the public
    model itself (every owner opted out), so it scores the oracle exactly; at layer 0 the merged
    model's router input is the public model's, so the two probes agree there."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "routing_diagnosis.py"
    spec = importlib.util.spec_from_file_location("routing_diagnosis", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, report = run
    bench.main(["--demo", str(out), "--probe-rows", "16", "--out", str(tmp_path / "d.json")])
    d = json.loads((tmp_path / "d.json").read_text())
    assert list(d["domains"]) == DOMAINS
    for domain, x in d["domains"].items():
        token = report["methods"]["flexolmo_token"]["per_domain"][domain]  # the diagnosis is of the token router
        assert x["flexolmo"] == pytest.approx(token, rel=1e-4)
        assert x["oracle"] == pytest.approx(report["methods"]["oracle"]["per_domain"][domain], rel=1e-4)
        assert all(0.0 <= v <= 1.0 for v in x["right_top1_share"] + x["right_pair_mass"])
    assert d["domains"]["public"]["right_pair_only"] == pytest.approx(d["domains"]["public"]["oracle"], rel=1e-5)
    (flex, public) = d["probe"].values()
    assert len(flex) == FAST.num_layers
    assert flex[0] == public[0]


@pytest.mark.slow
def test_flexolmo_is_the_posterior_routed_default_and_holds_the_fast_presets_ordering(run):
    """The default merged model routes by the posterior (the report records its routers' kind)
    and, on the --fast preset, is below what the demo promises it is below, by MARGIN, and within
    BTM_TARGET x `btm`. `btx` is left out: at this size its MoE fine-tuning on the public data
    helps every domain, and `flexolmo` was only 0.996x it when measured (87.28 vs 87.61), within
    noise of the margin."""
    _, report = run
    assert report["settings"]["flexolmo"]["posterior"]["router_kind"] == ["posterior"]
    avg = {m: r["average"] for m, r in report["methods"].items()}
    fo = avg["flexolmo"]
    rivals = (
        "public",
        *(f"expert:{o}" for o in OWNERS),
        "soup",
        "weighted_soup",
        "flexolmo_token",
        "flexolmo_published",
    )
    for rival in rivals:
        assert fo < MARGIN * avg[rival], (rival, fo, avg[rival])
    assert fo <= BTM_TARGET * avg["btm"], (fo, avg["btm"])


@pytest.mark.slow
def test_report_md_bolds_the_best_of_every_column(run):
    out, report = run
    text = (out / "report.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["method", *DOMAINS, "average"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1 : 1 + len(METHOD_KEYS)]]
    for j, column in enumerate(head[1:], start=1):
        bold = [row[0] for row in body if row[j].startswith("**")]
        assert bold, column
        best = min(
            (r for m, r in report["methods"].items() if m != "oracle"),
            key=lambda r: r["average"] if column == "average" else r["per_domain"][column],
        )
        value = best["average"] if column == "average" else best["per_domain"][column]
        assert any(row[j] == f"**{value:.1f}**" for row in body), column
    assert "## What the numbers mean" in text and "flexolmo" in text


# -- without training --------------------------------------------------------------------------------


def _methods(avg: dict[str, float]) -> dict:
    return {m: {"per_domain": dict.fromkeys(DOMAINS, v), "average": v} for m, v in avg.items()}


def test_findings_are_computed_from_the_table():
    avg = dict.fromkeys(METHOD_KEYS, 100.0) | {
        "btm": 50.0,
        "btm_top3_ema": 49.0,
        "oracle": 48.0,
        "flexolmo_no_rt": 60.0,
        "flexolmo_token": 55.0,
        "flexolmo_published": 70.0,
        "flexolmo": 52.0,
    }
    met = findings(_methods(avg), None)
    assert met[0].startswith("**The expected outcome is met**")
    assert "`flexolmo_token`" in met[0] and "`flexolmo_published`" in met[0]
    assert "1.04x" in met[2] and "within" in met[2] and "`btm_top3_ema`" in met[2]
    assert "(`flexolmo_no_rt`) to 55.0 (`flexolmo_token`; better by 5.0)" in met[3]
    worse = findings(_methods(avg | {"flexolmo_token": 51.0}), None)
    assert "is not met" in worse[0] and "not lower than `flexolmo_token` (51.0)" in worse[1]
    far = findings(_methods(avg | {"btm": 45.0}), None)
    assert "is not met" in far[0] and "outside" in far[2]


def test_findings_read_a_report_written_before_the_posterior_rows():
    old = [m for m in METHOD_KEYS if m not in ("btm_top3_ema", "flexolmo_token", "flexolmo_published")]
    avg = dict.fromkeys(old, 100.0) | {"btm": 50.0, "oracle": 48.0, "flexolmo_no_rt": 60.0, "flexolmo": 55.0}
    lines = findings(_methods(avg), None)
    assert "not met" in lines[0] and "`flexolmo_token`" not in lines[0]
    assert "(`flexolmo_no_rt`) to 55.0 (`flexolmo`; better by 5.0)" in lines[3]


def test_markdown_table_leaves_the_oracle_out_of_the_bold_contest():
    avg = dict.fromkeys(METHOD_KEYS, 100.0) | {"flexolmo": 60.0, "oracle": 10.0}
    table = markdown_table(_methods(avg), DOMAINS)
    assert re.search(r"\| `flexolmo` \| \*\*60\.0\*\*", table)
    assert "| *oracle* | *10.0*" in table and "**10.0**" not in table


def test_demo_config_is_validated_and_fast_overrides_merge():
    with pytest.raises(ValueError, match="expert_steps=0"):
        DemoConfig(expert_steps=0)
    with pytest.raises(ValueError, match="num_heads"):
        DemoConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="top_k"):
        DemoConfig(top_k=6)
    merged = DemoConfig.fast().overriding(DemoConfig(eval_tokens=256))
    assert merged == dataclasses.replace(DemoConfig.fast(), eval_tokens=256)


def test_demo_refuses_a_directory_that_is_not_an_earlier_demo(tmp_path):
    from flexmoe.experiments.demo import demo

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no earlier demo run"):
        demo(str(tmp_path), fast=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
