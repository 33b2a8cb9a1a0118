"""The model card every export carries (flexmoe.formats.model_card, flexmoe.core.provenance).

What docs/provenance.md promises: a merged export's ``README.md`` is a Hugging Face model card
naming each owner with its artifact's content hash (the one ``flexmoe inspect`` prints), spec hash,
training tokens, DP epsilon and what it shared; ``opt-out`` removes exactly that owner's record
and ``add-expert`` adds one, because the records travel in the model's own ``flexmoe_config.json``;
and no string from an owner's file can break the card's YAML header or its markdown.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from huggingface_hub import ModelCard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexmoe
from flexmoe.artifacts.guard import check_owner_name
from flexmoe.assembly import assemble_to_dir, merge_experts
from flexmoe.cli import main
from flexmoe.cli.inspect_artifact import artifact_contents
from flexmoe.core.errors import InputError
from flexmoe.core.hashing import content_sha256
from flexmoe.core.provenance import TEXT_CHARS, ExpertProvenance, Provenance
from flexmoe.core.surgery import moe_blocks
from flexmoe.core.surgery import settings as moe_settings
from flexmoe.formats import export as hf
from flexmoe.formats.model_card import README, evaluation_from_result, model_card
from flexmoe.testing import perturb_, tiny_model

OWNERS = ["alice", "bob", "carol"]
SPEC = "5" * 64
# What flexmoe.training.privacy writes for an expert trained with DP-SGD (the token counts exact).
DP = {
    "dp_epsilon": "3.0",
    "dp_delta": "1e-05",
    "dp_accountant": "rdp",
    "dp_covers": "expert",
    "dp_expert_epsilon": "3.0",
    "dp_noise_multiplier": "1.1",
    "dp_max_grad_norm": "1.0",
    "dp_sample_rate": "0.01",
    "dp_steps": "100",
}


def card_of(directory) -> ModelCard:
    return ModelCard.load(directory / README)


def records(card: ModelCard) -> dict[str, dict]:
    return {r["owner"]: r for r in card.data.flexmoe["experts"]}


@pytest.fixture
def public():
    """The public model (seeded, so every copy has one fingerprint); a merge upcycles it in place."""
    return tiny_model("olmo2")


@pytest.fixture(scope="module")
def artifact_files(tmp_path_factory):
    """Three owners' artifact files on ``public``: alice trained with DP, carol shipped bigrams."""
    model = flexmoe.upcycle(tiny_model("olmo2"), len(OWNERS), owners=OWNERS)
    for block in moe_blocks(model):
        for j in range(1, len(OWNERS) + 1):
            perturb_(block.experts[j], seed=j)
    out = tmp_path_factory.mktemp("artifacts")
    vocab = model.config.vocab_size
    paths = []
    for j, owner in enumerate(OWNERS, start=1):
        unigram = torch.arange(vocab, dtype=torch.float32) % (j + 2)
        bigram = torch.ones(16) if owner == "carol" else None
        art = flexmoe.ExpertArtifact.from_model(
            model, owner, owner, spec_sha256=SPEC, training_tokens=1000 * j, unigram=unigram, bigram=bigram
        )
        if owner == "alice":
            art.metadata.update(DP)
        paths.append(art.save(out / f"{owner}.safetensors"))
    return paths


@pytest.fixture(scope="module")
def merged(artifact_files, tmp_path_factory):
    """The published merge of all three, exported natively through the coordinator's pipeline."""
    out = tmp_path_factory.mktemp("merged") / "merged"
    merge_experts(tiny_model("olmo2"), artifact_files, routing="published", format="native", out=out)
    return out


def test_a_merged_export_card_names_every_owner_with_its_hashes(merged, artifact_files):
    card = card_of(merged)
    assert card.data.library_name == "flexmoe" and "mixture-of-experts" in card.data.tags
    got = records(card)
    assert list(got) == OWNERS
    for path in artifact_files:
        art = flexmoe.ExpertArtifact.load(path)
        r = got[art.owner]
        # The hash an owner sees with `flexmoe inspect` for the file it sent is the card's.
        assert (
            r["content_sha256"]
            == content_sha256(art.tensors, art.metadata)
            == artifact_contents(path)["content_sha256"]
        )
        assert r["spec_sha256"] == SPEC and r["training_tokens"] == art.training_tokens
        assert r["fingerprint"] == art.fingerprint
        assert f"`{r['content_sha256']}`" in card.text
    assert got["alice"]["dp_epsilon"] == "3.0" and got["bob"]["dp_epsilon"] is None
    assert got["carol"]["shared"] == ["expert_mlp", "router_row", "unigram_counts", "bigram_counts"]
    rows = {line.split(" | ")[1]: line for line in card.text.splitlines() if re.match(r"\| [1-9]", line)}
    assert "3\\.0 (delta 1e\\-05" in rows["alice"] and "| none |" in rows["bob"]
    assert "bigram counts" in rows["carol"] and "bigram counts" not in rows["bob"]
    assert card.data.flexmoe["routing"]["method"] == "published"
    for owner in OWNERS:
        assert f"flexmoe opt-out --model merged --owner {owner} --out merged-without-{owner}" in card.text


@pytest.mark.parametrize("fmt", ["flexolmo", "remote", "native"])
def test_every_format_carries_the_card(public, artifact_files, tmp_path, fmt):
    out = merge_experts(public, artifact_files[:2], routing="published", format=fmt, out=tmp_path / fmt).out
    assert list(records(card_of(out))) == OWNERS[:2]
    assert json.loads((out / hf.FLEXMOE_CONFIG).read_text())["provenance"]["experts"][0]["owner"] == "alice"


def test_the_streamed_merge_records_the_same_provenance(public, artifact_files, merged, tmp_path):
    public_dir = tmp_path / "public"
    public.save_pretrained(public_dir)
    streamed = assemble_to_dir(public_dir, artifact_files, tmp_path / "streamed", format="native")
    assert records(card_of(streamed)) == records(card_of(merged))


def test_opt_out_removes_exactly_that_owner_and_add_expert_adds_one(capsys, merged, artifact_files, tmp_path):
    before = records(card_of(merged))
    without = tmp_path / "without_bob"
    main(["opt-out", "--model", str(merged), "--owner", "bob", "--out", str(without)])
    after = records(card_of(without))
    assert after == {o: r for o, r in before.items() if o != "bob"}
    assert "| bob |" not in card_of(without).text and "--owner bob" not in card_of(without).text
    history = card_of(without).data.flexmoe["history"]
    assert history[-1] == {"event": "opted out", "owner": "bob", "content_sha256": before["bob"]["content_sha256"]}

    back = tmp_path / "back"
    main(["add-expert", "--model", str(without), "--expert", str(artifact_files[1]), "--out", str(back)])
    again = records(card_of(back))
    assert list(again) == ["alice", "carol", "bob"] and again["bob"] == before["bob"]
    capsys.readouterr()


def test_an_evaluation_goes_into_the_card_and_leaves_with_the_next_change(capsys, merged, tmp_path):
    result = {"models": {"merged": {"per_domain": {"law": 12.5, "med|x": 20.0}, "average": 16.25}}}
    (tmp_path / "eval.json").write_text(json.dumps(result))
    evaluated = tmp_path / "evaluated"
    main(
        ["export", "--model", str(merged), "--format", "native", "--evaluation", str(tmp_path / "eval.json")]
        + ["--out", str(evaluated)]
    )
    card = card_of(evaluated)
    assert card.data.flexmoe["evaluation"]["rows"] == [{"model": "merged", "values": [12.5, 20.0, 16.25]}]
    assert "| merged | 12.5 | 20 | 16.25 |" in card.text and "med\\|x" in card.text
    without = tmp_path / "without"
    main(["opt-out", "--model", str(evaluated), "--owner", "carol", "--out", str(without)])
    assert card_of(without).data.flexmoe["evaluation"] is None, "the table described the model carol was in"
    capsys.readouterr()


def test_a_model_without_records_says_so(tmp_path):
    model = flexmoe.upcycle(tiny_model("olmo2"), 2, owners=["x", "y"])
    card = card_of(flexmoe.export(model, tmp_path / "m", "native"))
    assert records(card) == {}
    assert "| 1 | x | no record |" in card.text


@pytest.mark.parametrize(
    "tamper",
    [
        lambda p: p["experts"][0].update(owner="mallory"),  # a record for an owner the model lacks
        lambda p: p["experts"][0].update(content_sha256="not a hash"),
        lambda p: p["experts"][0].update(shared=["the moon"]),
        lambda p: p["experts"][0].update(dp_epsilon="x" * (TEXT_CHARS + 1)),
        lambda p: p["experts"][0].update(dp_epsilon="1\n---\n"),
        lambda p: p["experts"].append(dict(p["experts"][0])),  # one owner twice
        lambda p: p.update(extra=1),
        lambda p: p["history"].append({"event": "deleted", "owner": "bob", "content_sha256": None}),
    ],
)
def test_load_refuses_tampered_provenance(merged, tmp_path, tamper):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in merged.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    meta = json.loads((copy / hf.FLEXMOE_CONFIG).read_text())
    tamper(meta["provenance"])
    (copy / hf.FLEXMOE_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="provenance"):
        flexmoe.load(copy)


def test_reloaded_provenance_equals_what_was_written(merged):
    model = flexmoe.load(merged)
    written = json.loads((merged / hf.FLEXMOE_CONFIG).read_text())["provenance"]
    assert moe_settings(model).provenance.to_json() == written


def test_evaluation_result_must_look_like_flexmoe_eval():
    with pytest.raises(InputError, match="flexmoe eval"):
        evaluation_from_result({"rows": []})


# -- hostile strings --------------------------------------------------------------------------

owner_names = st.text(min_size=1, max_size=40).filter(check_owner_name)
hostile = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["\n---\n", "---", "|", "<script>x</script>", "`", "```", "[a](b)", "*_x_*", "\r\n---\r\n"]),
    st.text(alphabet="\n\r\t\x00\x1b\u2028\u2029\x85\ufeff-|`<>:#&'\"", max_size=50),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    owners=st.lists(owner_names, min_size=1, max_size=4, unique=True), values=st.lists(hostile, min_size=6, max_size=6)
)
def test_no_metadata_string_breaks_the_yaml_header_or_the_markdown(owners, values):
    keys = ("spec_sha256", "fingerprint", "dp_epsilon", "dp_delta", "dp_covers", "materialized_from")
    provenance = Provenance()
    for owner in owners:
        meta = dict(zip(keys, values)) | {"training_tokens": values[0]}
        provenance.add(ExpertProvenance.of(owner, meta, ["layers.0.expert.w", "stats.unigram"], "a" * 64))
    provenance.set_routing({"method": values[1], values[2] or "k": values[3]})
    config = {"format": "native", "owners": ["public", *owners], "top_k": None, "router": "clamped"}
    card = ModelCard(str(model_card(provenance, config, values[4] or "m")))  # parses back from text
    assert card.data.flexmoe["experts"] == [r.to_json() for r in provenance.experts.values()]
    assert card.data.flexmoe["routing"] == provenance.routing
    for r in provenance.experts.values():  # bounded, printable, one line
        for v in (r.spec_sha256, r.dp_epsilon, r.materialized_from):
            assert v is None or (len(v) <= TEXT_CHARS and v.isprintable())
    lines = card.text.splitlines()
    table = [line for line in lines if re.match(r"\| [0-9]+ \| ", line)]
    assert len(table) == len(owners) + 1
    for line in table:  # no value adds a cell
        assert len(re.findall(r"(?<!\\)\|", line)) == 8, line
    assert not re.search(r"(?<!\\)<", "\n".join(lines[: lines.index("## Opting out")]))
    commands = [line for line in lines if line.startswith("flexmoe opt-out")]
    assert len(commands) == len(owners), "every owner's command is inside the fence, one line each"
