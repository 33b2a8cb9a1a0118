"""One assembly pipeline (flexmoe.assembly): the CLI, the coordinator and the Python API merge
the same experts into the same model, and a merge reproduces what each owner trained.

Two owners train a tiny expert each for a few real Lightning steps under a spec whose public
router row ``r_pub`` is not zero and whose routing recipe is the default (the posterior router),
and ship it with the statistics that recipe asks for (token counts, and the token router's MLP-input
statistics for the transformers exports), as ``flexmoe train-expert`` does.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoTokenizer

import flexmoe
from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.artifacts.guard import ArtifactError
from flexmoe.artifacts.unigram import write_public_statistics
from flexmoe.assembly import (
    MissingRoutingStatistics,
    assemble,
    assemble_to_dir,
    merge_experts,
    resolve_seq_len,
)
from flexmoe.cli import commands as cli_commands
from flexmoe.cli import main
from flexmoe.core.errors import InputError
from flexmoe.core.posterior import PosteriorRouter
from flexmoe.core.surgery import moe_blocks, settings
from flexmoe.data.datamodule import TextDataModule
from flexmoe.data.documents import read_documents
from flexmoe.data.statistics import packed_token_statistics
from flexmoe.federation.coordinator import Coordinator
from flexmoe.federation.settings import CoordinatorSettings
from flexmoe.formats.export import DEFAULT_FORMAT, export
from flexmoe.formats.load import load_public_model
from flexmoe.spec import DEFAULT_SEQ_LEN, ExpertRecipe, FederationSpec, RoutingRecipe
from flexmoe.testing import LICENSES, license_texts
from flexmoe.training.expert import ExpertModule, expert_callbacks

OWNERS = {"gpl": f"{LICENSES}/GPL-3", "apache": f"{LICENSES}/Apache-2.0"}


@pytest.fixture(scope="module")
def world(public_dir, tmp_path_factory):
    """The spec (non-zero r_pub, one row per layer), the public text, and each owner's trained
    module and artifact file."""
    root = tmp_path_factory.mktemp("assembly")
    public = load_public_model(public_dir)
    layers, hidden = public.config.num_hidden_layers, public.config.hidden_size
    r_pub = torch.randn(layers, hidden, generator=torch.Generator().manual_seed(5))
    spec = FederationSpec(
        public_model=str(public_dir),
        fingerprint=flexmoe.fingerprint(public),
        embedder=None,  # the hidden-state router init: no sentence embedder to load
        public_router_embedding=r_pub.tolist(),
        expert=ExpertRecipe(max_steps=4, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1),
    )
    spec_path = spec.save(root / "spec.json")
    public_data = root / "public.jsonl"
    public_data.write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in license_texts()[2:10]))
    modules, paths = {}, {}
    for owner, text in OWNERS.items():
        pl.seed_everything(0)
        module = ExpertModule(spec.public_model, spec, owner=owner)
        data = TextDataModule(
            text, tokenizer=spec.public_model, seq_len=32, batch_size=4, cache_dir=root / "cache", val_fraction=0.0
        )
        paths[owner] = root / f"{owner}.safetensors"
        trainer = pl.Trainer(
            max_steps=spec.expert.max_steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            default_root_dir=root,
            callbacks=expert_callbacks(spec, paths[owner]),
        )
        trainer.fit(module, data)
        modules[owner] = module.model.eval()
    return {"spec": spec, "spec_path": spec_path, "public_data": public_data, "modules": modules, "paths": paths}


@pytest.fixture
def ids(public_dir):
    vocab = load_public_model(public_dir).config.vocab_size
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: {sorted(a.keys() ^ b.keys())[:6]}"
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{what}: {name} differs"


def unigram_recipe():
    """The posterior recipe routing by unigram counts alone."""
    return RoutingRecipe(bigram_buckets=0)


def without(path, tmp_path, *parts: str):
    """A copy of the artifact at ``path`` without the tensors whose names end with ``parts``."""
    art = ExpertArtifact.load(path)
    tensors = {k: v for k, v in art.tensors.items() if not k.endswith(parts)}
    dropped = {"stats_tokens"} if "stats.mean" in parts else set()
    dropped |= {"unigram_tokens"} if "stats.unigram" in parts else set()
    dropped |= {"bigram_pairs"} if "stats.bigram" in parts else set()
    metadata = {k: v for k, v in art.metadata.items() if k not in dropped}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return ExpertArtifact(art.owner, tensors, metadata).save(tmp_path / path.name)


# -- r_0: a merge of one owner's expert is that owner's model ------------------------------------


@pytest.mark.slow
def test_a_one_owner_merge_reproduces_the_owners_trained_model(world, public_dir, tmp_path, ids):
    """The owner trained r_1 and beta_1 beside r_0 = the spec's r_pub; the merge must put that r_0
    back (the artifact records it), or the owner's own routing is not what it trained."""
    own = world["modules"]["gpl"]
    r_0 = torch.stack([b.router.weight[0] for b in moe_blocks(own)])
    assert torch.equal(r_0, torch.tensor(world["spec"].public_router_embedding))  # r_pub, not zeros
    want = logits(own, ids)

    merged = assemble(load_public_model(public_dir), [world["paths"]["gpl"]], top_k=2).eval()  # no spec needed
    torch.testing.assert_close(logits(merged, ids), want, rtol=0, atol=1e-6)
    streamed = assemble_to_dir(public_dir, [world["paths"]["gpl"]], tmp_path / "streamed", format="native", top_k=2)
    torch.testing.assert_close(logits(flexmoe.load(streamed).eval(), ids), want, rtol=0, atol=1e-6)
    piped = merge_experts(public_dir, [world["paths"]["gpl"]], spec=world["spec"], routing="published", top_k=2)
    torch.testing.assert_close(logits(piped.model, ids), want, rtol=0, atol=1e-6)

    # What the merge did before artifacts carried r_0: the public row at zero is another model.
    with torch.no_grad():
        for block in moe_blocks(merged):
            block.router.weight[0].zero_()
    assert (logits(merged, ids) - want).abs().max() > 1e-3


@pytest.mark.slow
def test_an_artifact_without_r0_takes_the_specs_r_pub_and_without_a_spec_zeros_with_a_warning(
    world, public_dir, tmp_path, ids
):
    old = without(world["paths"]["gpl"], tmp_path, "router.public_embedding")
    assert ExpertArtifact.load(old).public_router_rows is None  # still loads
    want = logits(world["modules"]["gpl"], ids)
    with_spec = merge_experts(public_dir, [old], spec=world["spec"], routing="published", top_k=2).model
    torch.testing.assert_close(logits(with_spec, ids), want, rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="r_0"):
        no_spec = assemble(load_public_model(public_dir), [old], top_k=2)
    assert all(not b.router.weight[0].any() for b in moe_blocks(no_spec))


@pytest.mark.slow
def test_experts_trained_against_different_public_rows_are_refused(world, public_dir, tmp_path):
    art = ExpertArtifact.load(world["paths"]["apache"])
    tensors = dict(art.tensors)
    tensors["layers.0.router.public_embedding"] = tensors["layers.0.router.public_embedding"] + 1.0
    other = ExpertArtifact(art.owner, tensors, art.metadata).save(tmp_path / "apache.safetensors")
    with pytest.raises(ArtifactError, match="'apache'") as e:
        assemble(load_public_model(public_dir), [world["paths"]["gpl"], other])
    assert e.value.field == "router.public_embedding (r_0)"
    with pytest.raises(ArtifactError, match="'apache'"):
        assemble_to_dir(public_dir, [world["paths"]["gpl"], other], tmp_path / "out")
    with pytest.raises(ArtifactError, match="spec's public_router_embedding"):
        merge_experts(public_dir, [other], spec=world["spec"], routing="published")


# -- one pipeline: the CLI, the coordinator and the API give the same model ---------------------


def coordinator_for(world, tmp_path, owners, paths, **settings) -> Coordinator:
    """A coordinator whose accepted artifacts are already in place, as after a restart (no Flower
    grid: router tuning is off)."""
    settings = CoordinatorSettings(
        spec=str(world["spec_path"]),
        expected_owners=owners,
        out_dir=str(tmp_path / "coordinator"),
        public_data=str(world["public_data"]),
        resume=True,
        **{"router_tuning": False, **settings},
    )
    (tmp_path / "coordinator" / "artifacts").mkdir(parents=True)
    for owner, path in zip(owners, paths, strict=True):
        shutil.copy(path, tmp_path / "coordinator" / "artifacts" / f"{owner}.safetensors")
    coordinator = Coordinator(None, settings)
    coordinator.start()
    coordinator.prepare()
    return coordinator


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["auto", "flexolmo"])
def test_cli_coordinator_and_api_merge_the_same_model(world, public_dir, tmp_path, capsys, fmt):
    """The spec's recipe, the posterior router (public counts from the public text, packed at the
    spec's row length), run three ways: bit-identical models. ``auto`` writes it natively; a
    FlexOlmo export asked for by name carries the recipe's token router (LDA from the owners'
    statistics, folded), labelled as such in the summary, the export and the CLI's output."""
    owners, paths = list(OWNERS), [world["paths"][o] for o in OWNERS]
    api = merge_experts(
        public_dir,
        paths,
        spec=world["spec"],
        public_documents=read_documents(str(world["public_data"])),
        format=fmt,
        out=tmp_path / "api",
    )
    posterior = fmt == "auto"
    assert api.routing["recipe"] == "posterior" and api.routing["seq_len"] == world["spec"].expert.seq_len
    if posterior:
        assert api.routing["method"] == api.routing["router"] == "posterior" and api.format == "native"
        assert api.routing["public_statistics"] == "public_documents"
        assert all(isinstance(b.router, PosteriorRouter) for b in moe_blocks(api.model))
    else:
        assert api.routing["method"] == "lda" and api.routing["folded"] and api.routing["router"] == "token (lda)"
    exported = json.loads((tmp_path / "api" / "flexmoe_config.json").read_text())
    assert exported["routing"]["router"] == api.routing["router"]

    argv = ["assemble", "--public", public_dir, "--experts", *paths, "--out", tmp_path / "cli"]
    argv += ["--spec", world["spec_path"], "--public-data", world["public_data"], "--format", fmt]
    main([str(a) for a in argv])
    printed = capsys.readouterr().out
    assert f"routing: {api.routing['router']}" in printed
    assert ("carries the recipe's token router" in printed) == (not posterior)

    coordinator = coordinator_for(world, tmp_path, owners, paths, export_format=fmt)
    coordinated = coordinator.merge(owners)
    recipe = coordinator.summary["routing_recipe"]
    assert recipe["method"] == ("posterior" if posterior else "lda") and recipe["recipe"] == "posterior"
    if posterior:
        default = RoutingRecipe()
        assert {k: recipe[k] for k in ("temperature", "smoothing", "reset_at_eos", "bigram_buckets")} == {
            "temperature": default.temperature,
            "smoothing": default.smoothing,
            "reset_at_eos": False,
            "bigram_buckets": default.bigram_buckets,
        }
    assert coordinator.summary["export"]["format"] == ("native" if posterior else "flexolmo")

    reference = state(api.model)
    assert_same_state(state(coordinated), reference, "the coordinator's model")
    for name in ("api", "cli", "coordinator/model"):
        assert_same_state(state(flexmoe.load(tmp_path / name)), reference, f"the {name} export")


@pytest.mark.slow
def test_the_coordinator_skips_router_tuning_for_the_posterior_recipe_and_says_so(world, public_dir, tmp_path):
    """Router tuning tunes token routers: asked for under the posterior recipe, the coordinator
    merges with the posterior, does not tune, and its report says so and records the recipe."""
    owners, paths = list(OWNERS), [world["paths"][o] for o in OWNERS]
    coordinator = coordinator_for(world, tmp_path, owners, paths, router_tuning=True)
    coordinator.merge(owners)
    note = "router tuning tunes token routers; the posterior recipe was not tuned"
    assert coordinator.summary["router_tuning"] == {"skipped": note}
    report = coordinator.finish("merged")
    assert report["routing_recipe"]["method"] == "posterior" and note in report["notes"]
    md = (tmp_path / "coordinator" / "report.md").read_text()
    assert f"posterior router (temperature {RoutingRecipe().temperature}, smoothing 0.1" in md and note in md


@pytest.mark.slow
def test_the_specs_public_statistics_give_the_model_the_public_text_gives(world, public_dir, tmp_path, ids):
    """``flexmoe spec --public-data`` writes the public counts next to the spec; a merge given that
    spec (by path) needs no public text and builds the model the public text builds, and routes
    like the owner's own model where the posterior is certain."""
    docs = read_documents(str(world["public_data"]))
    spec_path = tmp_path / "spec.json"
    tokenizer = AutoTokenizer.from_pretrained(public_dir)
    vocab = load_public_model(public_dir).config.vocab_size
    buckets = world["spec"].routing.bigram_buckets
    counts = packed_token_statistics(docs, tokenizer, world["spec"].expert.seq_len, vocab, buckets)
    spec = dataclasses.replace(world["spec"], public_statistics=write_public_statistics(spec_path, counts))
    spec.save(spec_path)
    paths = [world["paths"][o] for o in OWNERS]
    sha = world["spec"].sha256  # the owners trained under the spec without the public-statistics record
    from_file = merge_experts(public_dir, paths, spec=spec_path, spec_sha256=sha)
    from_text = merge_experts(public_dir, paths, spec=world["spec"], public_documents=docs)
    assert from_file.routing["public_statistics"] == "spec" and from_file.format == "native"
    assert_same_state(state(from_file.model), state(from_text.model), "the model from the spec's counts")
    block = moe_blocks(from_file.model)[0]
    assert torch.equal(block.router.unigram[0], counts.unigram) and torch.equal(block.router.bigram[0], counts.bigram)
    assert torch.equal(block.router.unigram[1], ExpertArtifact.load(paths[0]).unigram)
    # An object without its path cannot find the file: what to pass is said, nothing else is routed.
    with pytest.raises(InputError, match="spec_path"):
        merge_experts(public_dir, paths, spec=spec, spec_sha256=sha)
    merge_experts(public_dir, paths, spec=spec, spec_path=spec_path, spec_sha256=sha)


# -- the rules every caller shares -------------------------------------------------------------


@pytest.mark.slow
def test_missing_statistics_are_an_error_naming_every_owner_and_the_coordinator_refuses_them(
    world, public_dir, tmp_path, capsys
):
    bare = [without(world["paths"][o], tmp_path, "stats.mean", "stats.covariance") for o in OWNERS]
    docs = read_documents(str(world["public_data"]))
    with pytest.raises(MissingRoutingStatistics, match="published") as e:
        merge_experts(public_dir, bare, spec=world["spec"], routing="lda", public_documents=docs)
    assert e.value.owners == list(OWNERS)

    argv = ["assemble", "--public", public_dir, "--experts", *bare, "--out", tmp_path / "out", "--routing", "lda"]
    with pytest.raises(SystemExit):
        main([str(a) for a in [*argv, "--spec", world["spec_path"], "--public-data", world["public_data"]]])
    err = capsys.readouterr().err
    assert err.startswith("flexmoe: error: ") and "'gpl'" in err and "'apache'" in err and "Traceback" not in err

    coordinator = Coordinator(
        None,
        CoordinatorSettings(
            spec=str(world["spec_path"]),
            expected_owners=["gpl"],
            out_dir=str(tmp_path / "coordinator"),
            public_data=str(world["public_data"]),
            router_tuning=False,
            export_format="flexolmo",  # the posterior spec's FlexOlmo export: its token router (lda)
        ),
    )
    coordinator.start()
    coordinator.prepare()
    with pytest.raises(ArtifactError, match="'gpl'") as e:
        coordinator.check_artifact(bare[0], "gpl")
    assert e.value.field == "routing statistics" and "published" in str(e.value)
    coordinator.check_artifact(world["paths"]["gpl"], "gpl")  # the owner's genuine artifact passes

    no_public_text = CoordinatorSettings(
        spec=str(world["spec_path"]), expected_owners=["gpl"], out_dir=str(tmp_path / "c2"), router_tuning=False
    )
    with pytest.raises(InputError, match="public-data"):
        Coordinator(None, no_public_text).start()


@pytest.mark.slow
def test_the_posterior_recipe_refuses_artifacts_without_token_counts_everywhere(world, public_dir, tmp_path, capsys):
    """An artifact without ``stats.unigram`` under the posterior recipe: the API names every such
    owner, the CLI says it in one line, the coordinator refuses it at acceptance with the reason;
    and without any public counts the merge says what to pass instead of routing another way."""
    bare = [without(world["paths"][o], tmp_path, "stats.unigram", "stats.bigram") for o in OWNERS]
    docs = read_documents(str(world["public_data"]))
    with pytest.raises(MissingRoutingStatistics, match="stats.unigram") as e:
        merge_experts(public_dir, bare, spec=world["spec"], public_documents=docs)
    assert e.value.owners == list(OWNERS) and "'lda'" in str(e.value)
    # Unigrams alone do not make do for a recipe that routes by bigrams: it names what is missing.
    unigrams_only = without(world["paths"]["gpl"], tmp_path / "uni", "stats.bigram")
    with pytest.raises(MissingRoutingStatistics, match="stats.bigram") as e:
        merge_experts(public_dir, [unigrams_only], spec=world["spec"], public_documents=docs)
    merge_experts(public_dir, [unigrams_only], spec=world["spec"], public_documents=docs, routing=unigram_recipe())
    capsys.readouterr()

    argv = ["assemble", "--public", public_dir, "--experts", *bare, "--out", tmp_path / "out"]
    with pytest.raises(SystemExit):
        main([str(a) for a in [*argv, "--public-data", world["public_data"], "--routing", "posterior"]])
    err = capsys.readouterr().err
    assert err.startswith("flexmoe: error: ") and "'gpl'" in err and "'apache'" in err and "Traceback" not in err

    coordinator = Coordinator(
        None,
        CoordinatorSettings(
            spec=str(world["spec_path"]),
            expected_owners=["gpl"],
            out_dir=str(tmp_path / "coordinator"),
            public_data=str(world["public_data"]),
            router_tuning=False,
        ),
    )
    coordinator.start()
    coordinator.prepare()
    with pytest.raises(ArtifactError, match="'gpl'") as e:
        coordinator.check_artifact(bare[0], "gpl")
    assert e.value.field == "routing statistics" and "stats.unigram" in str(e.value)
    coordinator.check_artifact(world["paths"]["gpl"], "gpl")

    paths = [world["paths"][o] for o in OWNERS]
    with pytest.raises(InputError, match="--public-data"):
        merge_experts(public_dir, paths, spec=world["spec"])  # the spec carries no public statistics
    with pytest.raises(InputError, match="--public-data"):
        merge_experts(public_dir, paths, routing="posterior")
    no_public = CoordinatorSettings(
        spec=str(world["spec_path"]), expected_owners=["gpl"], out_dir=str(tmp_path / "c2"), router_tuning=False
    )
    with pytest.raises(InputError, match="public-data"):
        Coordinator(None, no_public).start()
    # The CLI without public data or a spec: the published merge, as before (nothing to route by).
    main([str(a) for a in ["assemble", "--public", public_dir, "--experts", *paths, "--out", tmp_path / "pub"]])
    assert "routing: published" in capsys.readouterr().out


@pytest.mark.slow
def test_add_expert_opt_out_and_eval_work_on_a_posterior_model(world, public_dir, tmp_path, capsys, ids):
    """The CLI's opt-out and add-expert on a native posterior model: taking an owner out and
    putting it back gives the model back bit for bit; an owner without token counts is refused;
    eval scores the model and its routing."""
    paths = [world["paths"][o] for o in OWNERS]
    merged = tmp_path / "merged"
    argv = ["assemble", "--public", public_dir, "--experts", *paths, "--out", merged]
    main([str(a) for a in [*argv, "--public-data", world["public_data"], "--spec", world["spec_path"]]])
    main([str(a) for a in ["opt-out", "--model", merged, "--owner", "apache", "--out", tmp_path / "without"]])
    without_apache = flexmoe.load(tmp_path / "without")
    assert settings(without_apache).owners == ["public", "gpl"]
    assert all(isinstance(b.router, PosteriorRouter) for b in moe_blocks(without_apache))
    main(
        [
            str(a)
            for a in ["add-expert", "--model", tmp_path / "without", "--expert", paths[1], "--out", tmp_path / "back"]
        ]
    )
    assert_same_state(state(flexmoe.load(tmp_path / "back")), state(flexmoe.load(merged)), "opt-out then add-expert")
    capsys.readouterr()

    bare = without(paths[1], tmp_path, "stats.unigram")
    with pytest.raises(SystemExit):
        main(
            [str(a) for a in ["add-expert", "--model", tmp_path / "without", "--expert", bare, "--out", tmp_path / "x"]]
        )
    err = capsys.readouterr().err
    assert err.startswith("flexmoe: error: ") and "apache" in err and "unigram" in err

    out = tmp_path / "eval.json"
    data = ["--data", f"gpl={OWNERS['gpl']}", "--data", f"apache={OWNERS['apache']}"]
    main([str(a) for a in ["eval", "--model", merged, *data, "--json", out, "--seq-len", 32, "--max-tokens", 320]])
    result = json.loads(out.read_text())["models"][str(merged)]
    assert set(result["per_domain"]) == {"gpl", "apache"} and "routing" in result


def test_public_rows_are_packed_at_the_specs_length_else_one_default():
    spec = FederationSpec(public_model="public", fingerprint="0" * 64, expert=ExpertRecipe(seq_len=32))
    assert resolve_seq_len(spec) == spec.expert.seq_len == 32
    assert resolve_seq_len(None) == DEFAULT_SEQ_LEN == ExpertRecipe().seq_len
    assert resolve_seq_len(None, 64) == 64
    with pytest.raises(InputError, match="expert.seq_len"):
        resolve_seq_len(spec, 64)


def test_one_default_export_format_everywhere():
    for fn in (export, assemble_to_dir, merge_experts, cli_commands.assemble, cli_commands.export):
        assert inspect.signature(fn).parameters["format"].default == DEFAULT_FORMAT, fn.__qualname__
