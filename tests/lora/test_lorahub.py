"""LoraHub (Huang et al., 2024): gradient-free weights for an element-wise sum of LoRA adapters.

Three real LoRA adapters (licence texts, Python code, Unicode character names) are trained on a
tiny OLMo-2 model and saved as peft directories; LoraHub then composes them for a few examples of
one of those tasks."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexmoe.data.corpus import local_corpus
from flexmoe.data.packing import pack_domain
from flexmoe.lora import LoraHub, lora_factors
from flexmoe.testing import license_texts, train_peft_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def snippets(docs, n, width=200):
    """``n`` pieces of ``width`` characters cut from ``docs``: the examples of a task."""
    out = [d[k : k + width] for d in docs for k in range(0, len(d) - width, width)]
    return out[:n]


def train_lora(base, tokenizer, docs, rank=4, steps=40, seed=0):
    return train_peft_lora(base, pack_domain(docs, tokenizer, 32), TARGETS, rank=rank, steps=steps, seed=seed)


@pytest.fixture(scope="module")
def pool(public_dir, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(public_dir)
    base = AutoModelForCausalLM.from_pretrained(public_dir).eval()
    licenses = license_texts()
    corpus = local_corpus(max_docs_per_domain=12, domains=["stdlib_code", "unicode_names"])
    tasks = {
        "licenses": (licenses[:-3], licenses[-3:]),
        "code": (corpus["stdlib_code"].train, corpus["stdlib_code"].val),
        "unicode": (corpus["unicode_names"].train, corpus["unicode_names"].val),
    }
    root = tmp_path_factory.mktemp("adapters")
    dirs, models = {}, {}
    for name, (train, _) in tasks.items():
        models[name] = train_lora(base, tokenizer, train)
        models[name].save_pretrained(root / name, save_embedding_layers=False)
        dirs[name] = root / name
    return base, tokenizer, tasks, dirs, models


@pytest.fixture(scope="module")
def fitted(pool):
    base, tokenizer, tasks, dirs, _ = pool
    hub = LoraHub(copy.deepcopy(base), dirs, snippets(tasks["code"][0], 5), tokenizer=tokenizer)
    return hub, hub.fit()


def test_returns_the_best_weights_it_evaluated_with_start_and_uniform_among_them(fitted):
    hub, result = fitted
    history = result.history
    assert 2 < len(history) <= 40  # the default budget
    assert history[0].weights == (0.0, 0.0, 0.0)  # the start (the paper's code starts at zero)
    assert history[1].weights == pytest.approx((1 / 3, 1 / 3, 1 / 3), abs=1e-6)  # uniform
    best = min(history, key=lambda c: c.objective)
    assert result.objective == best.objective and tuple(result.weights) == best.weights
    for c in history:  # objective = few-shot loss + 0.05 * mean |w|, w in [-1.5, 1.5]
        assert c.objective == pytest.approx(c.loss + 0.05 * sum(abs(w) for w in c.weights) / 3)
        assert all(-1.5 <= w <= 1.5 for w in c.weights)
    assert result.objective < history[1].objective  # the search found better than uniform
    assert hub.loss(result.weights) == pytest.approx(result.loss, abs=1e-6)  # re-evaluation agrees
    assert list(result.weights_by_name()) == ["licenses", "code", "unicode"]


def test_beats_uniform_weights_on_held_out_examples_of_the_task(fitted, pool):
    hub, result = fitted
    held_out = snippets(pool[2]["code"][1], 16)  # validation modules: never seen by the adapters or LoraHub
    assert hub.loss(result.weights, held_out) < hub.loss([1 / 3] * 3, held_out) - 0.1


def test_saved_adapter_and_merged_model_reproduce_the_composition(fitted, pool, tmp_path, ids):
    hub, result = fitted
    base = pool[0]
    ids = ids % 288
    hub.combine(result.weights)
    with torch.no_grad():
        want = hub.model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), result.save(tmp_path / "composed")).eval()
        assert torch.allclose(reloaded(input_ids=ids).logits, want, atol=1e-6)
        merged = copy.deepcopy(result).merged_model()  # peft's merge_and_unload: a plain model
        assert not isinstance(merged, PeftModel) and not any("lora" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)


def test_peft_models_and_saved_directories_are_the_same_adapters(pool):
    base, tokenizer, tasks, dirs, models = pool
    examples = snippets(tasks["unicode"][0], 3)
    from_dirs = LoraHub(copy.deepcopy(base), dirs, examples, tokenizer=tokenizer, progress=False)
    from_models = LoraHub(copy.deepcopy(base), models, examples, tokenizer=tokenizer, progress=False)
    w = [0.2, -0.7, 1.1]
    assert from_models.loss(w) == pytest.approx(from_dirs.loss(w), abs=1e-6)
    assert from_dirs.loss([0, 0, 1]) < from_dirs.loss([1, 0, 0])  # the unicode adapter fits unicode text


def _nll(model, ids, first):
    """Mean next-token NLL of ``ids`` ``[T]`` from position ``first`` on, computed directly."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), dim=-1)
    return float(-logp.gather(-1, ids[1:, None])[first - 1 :].mean())


def test_pairs_put_the_loss_on_the_output_tokens_only(pool):
    """With one-hot weights the composition is that adapter; its loss on a pair is the mean NLL of
    the output's tokens given the input, and on a plain string that of every token after the first,
    both computed here with the adapter's own peft model."""
    base, tokenizer, _, dirs, models = pool
    source, target = "U+0041 A ", "LATIN CAPITAL LETTER A"
    hub = LoraHub(copy.deepcopy(base), dirs, [(source, target)], tokenizer=tokenizer, progress=False)
    batch = hub.batches[0]
    src = tokenizer(source, add_special_tokens=False)["input_ids"]
    tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
    n_in = len(src)
    assert (batch["labels"][0, :n_in] == -100).all() and (batch["labels"][0, n_in:] >= 0).all()
    unicode = models["unicode"]
    assert hub.loss([0, 0, 1]) == pytest.approx(_nll(unicode, torch.tensor(src + tgt), n_in), abs=1e-5)
    whole = torch.tensor(tokenizer(source + target, add_special_tokens=False)["input_ids"])
    assert hub.loss([0, 0, 1], [source + target]) == pytest.approx(_nll(unicode, whole, 1), abs=1e-5)


def test_the_composition_is_the_weighted_sum_of_the_a_and_b_factors(pool, ids):
    """Eq. 2 is element-wise on A and on B, ``(sum w_i B_i)(sum w_i A_i)``, not a weighted sum of
    the updates ``sum w_i B_i A_i``: checked against forward hooks on a plain copy of the base that
    add ``scaling · B A x`` with A and B combined here from the adapters' own factors."""
    base, tokenizer, tasks, dirs, models = pool
    ids = ids % len(tokenizer)
    w = [0.6, -0.9, 1.3]
    factors = [lora_factors(models[name]) for name in ("licenses", "code", "unicode")]
    hub = LoraHub(copy.deepcopy(base), dirs, ["x y z"], tokenizer=tokenizer, progress=False)

    def with_updates(update):
        reference = copy.deepcopy(base)
        for name in factors[0]:
            delta = update(name)
            reference.get_submodule(name).register_forward_hook(lambda m, args, out, d=delta: out + args[0] @ d.T)
        with torch.no_grad():
            return reference(input_ids=ids).logits

    def composed(name):
        A = sum(wi * f[name].A for wi, f in zip(w, factors))
        B = sum(wi * f[name].B for wi, f in zip(w, factors))
        return factors[0][name].scaling * B @ A

    hub.combine(w)
    with torch.no_grad():
        got = hub.model(input_ids=ids).logits
    torch.testing.assert_close(got, with_updates(composed), atol=1e-5, rtol=1e-5)
    summed = with_updates(lambda name: sum(wi * f[name].delta() for wi, f in zip(w, factors)))
    assert (got - summed).abs().max() > 1e-2  # the check can tell the two compositions apart


def test_incompatible_or_unsafe_adapters_are_refused(pool, tmp_path):
    base, tokenizer, tasks, dirs, _ = pool
    other_rank = train_lora(base, tokenizer, tasks["code"][0][:2], rank=2, steps=1)
    with pytest.raises(ValueError, match="same rank and alpha"):
        LoraHub(copy.deepcopy(base), {"a": dirs["code"], "b": other_rank}, ["x y z"], tokenizer=tokenizer)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((dirs["code"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match="never loads"):
        LoraHub(copy.deepcopy(base), {"a": dirs["code"], "b": pickled}, ["x y z"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="budget"):
        LoraHub(copy.deepcopy(base), dirs, ["x y z"], tokenizer=tokenizer, budget=1)


def test_seq2seq_models_work_too(pool, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = pool[1]
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=2,
    )
    t5 = T5ForConditionalGeneration(config).eval()
    for i in range(2):
        adapter = get_peft_model(copy.deepcopy(t5), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v", "wo"]))
        with torch.no_grad():
            for n, p in adapter.named_parameters():
                if "lora_B" in n:
                    p.normal_(generator=torch.Generator().manual_seed(i))
        adapter.save_pretrained(tmp_path / f"t5_{i}")
    pairs = [("GNU General Public", " License"), ("Permission is hereby", " granted")]
    plain = copy.deepcopy(t5)
    hub = LoraHub(t5, [tmp_path / "t5_0", tmp_path / "t5_1"], pairs, tokenizer=tokenizer, budget=6, progress=False)
    result = hub.fit()
    assert len(result.history) <= 6 and result.objective == min(c.objective for c in result.history)
    # the loss of a composition, computed directly: adapter 0's peft model with A and B replaced by
    # the weighted sums of the two saved adapters' factors, and T5's own loss on each pair's output
    saved = [load_file(str(tmp_path / f"t5_{i}" / "adapter_model.safetensors")) for i in range(2)]
    for w in ([1.0, 0.0], [0.3, -1.2]):
        reference = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "t5_0").eval()
        state = {k: w[0] * saved[0][k] + w[1] * saved[1][k] for k in saved[0]}
        set_peft_model_state_dict(reference, state)
        total, count = 0.0, 0
        with torch.no_grad():
            for source, target in pairs:
                x = torch.tensor([tokenizer(source, add_special_tokens=False)["input_ids"]])
                y = torch.tensor([tokenizer(target, add_special_tokens=False)["input_ids"]])
                total += float(reference(input_ids=x, labels=y).loss) * y.numel()
                count += y.numel()
        assert hub.loss(w) == pytest.approx(total / count, abs=1e-5), w
