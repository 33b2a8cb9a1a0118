"""LoraHub: compose LoRA adapters for a new task from a few examples, without gradients.

Huang et al., 2024 ("LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition", arXiv 2307.13269), section 3: given LoRA modules ``(A_i, B_i)`` trained on other
tasks, the composed module is, element-wise,

    A = sum_i w_i A_i        B = sum_i w_i B_i                                  (eq. 2)

and ``w`` in ``[-1.5, 1.5]^N`` minimises, gradient-free (nevergrad; the paper uses its
``NGOpt``), the few-shot loss plus ``0.05 * mean_i |w_i|`` (eq. 3 with the paper code's
L1 term). Every candidate costs one batched forward pass over the examples; nothing trains.

>>> hub = LoraHub(base, {"qa": "adapters/qa", "sum": "adapters/sum"}, examples, tokenizer=tok)
>>> result = hub.fit()                     # tries at most `budget` weight vectors
>>> result.weights, result.save("composed/")
>>> merged = result.merged_model()         # peft's merge_and_unload: a plain transformers model
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from flexmoe.artifacts.peft_adapters import PEFT_WEIGHTS, LoraFactors, check_peft_dir, lora_factors, lora_layers

Example = str | tuple[str, str] | Mapping[str, str]
AdapterSource = str | os.PathLike | nn.Module


@dataclass
class Candidate:
    """One evaluated weight vector: its few-shot loss and objective (loss + L1 term)."""

    weights: tuple[float, ...]
    loss: float
    objective: float


@dataclass
class LoraHubResult:
    """What :meth:`LoraHub.fit` found: the best weights it evaluated and the composed adapter.

    ``adapter`` is the composed LoRA in ``peft``'s saved layout (the keys of
    ``adapter_model.safetensors``); ``model`` is the ``peft`` model with it active.
    """

    names: list[str]
    weights: list[float]
    loss: float
    objective: float
    history: list[Candidate]
    adapter: dict[str, torch.Tensor] = field(repr=False)
    config: object = field(repr=False)
    model: nn.Module = field(repr=False)

    def weights_by_name(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the composed adapter as a ``peft`` adapter directory (``PeftModel.from_pretrained`` reads it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(directory))
        save_file(
            {k: v.contiguous() for k, v in self.adapter.items()},
            str(directory / PEFT_WEIGHTS),
            metadata={"format": "pt"},
        )
        return directory

    def merged_model(self) -> nn.Module:
        """The base model with the composed adapter merged into its weights (``merge_and_unload``).

        The base model's weights change in place; the LoRA layers are removed.
        """
        return self.model.merge_and_unload()


class LoraHub:
    """Find LoraHub weights for ``adapters`` on a few ``examples`` of a new task.

    Args:
        base: the ``transformers`` model the adapters were trained on (causal LM or seq2seq).
            LoRA layers are added to it in place.
        adapters: ``{name: source}`` or a list of sources; a source is a saved ``peft`` adapter
            directory (safetensors weights) or a ``peft`` model (its active adapter). All must
            share rank, scaling and target modules, so that eq. 2 is defined.
        examples: the few-shot examples: ``(input, output)`` pairs or ``{"input", "output"}``
            maps (loss on the output tokens), or plain strings (loss on every token; causal LMs).
        tokenizer: the base model's tokenizer.
        budget: most weight vectors evaluated (one batched pass over the examples each),
            including the start and the uniform weights, which are always evaluated first.
        bound: weights lie in ``[-bound, bound]``.
        l1: coefficient of the ``mean |w|`` regulariser.
        start: first weights (default zeros, as the paper's code starts).
        batch_size: examples per forward pass.
        max_length: longest example in tokens; longer ones lose tokens from the input's start.
        optimizer: a nevergrad optimizer name (``ng.optimizers.registry``).
        seed: seeds the optimizer.
        progress: show a progress bar.
    """

    ADAPTER = "lorahub"

    def __init__(
        self,
        base: nn.Module,
        adapters: Mapping[str, AdapterSource] | Sequence[AdapterSource],
        examples: Sequence[Example],
        *,
        tokenizer=None,
        budget: int = 40,
        bound: float = 1.5,
        l1: float = 0.05,
        start: Sequence[float] | None = None,
        batch_size: int = 8,
        max_length: int = 512,
        optimizer: str = "NGOpt",
        seed: int = 0,
        progress: bool = True,
    ):
        named = dict(adapters) if isinstance(adapters, Mapping) else _default_names(adapters)
        if not named:
            raise ValueError("LoraHub needs at least one adapter")
        if budget < 2:
            raise ValueError(f"budget must be at least 2 (the start and the uniform weights), got {budget}")
        if not bound > 0 or l1 < 0 or batch_size < 1 or max_length < 2:
            raise ValueError(
                f"need bound > 0, l1 >= 0, batch_size >= 1, max_length >= 2; got bound={bound}, "
                f"l1={l1}, batch_size={batch_size}, max_length={max_length}"
            )
        self.names = list(named)
        n = len(self.names)
        self.start = np.zeros(n) if start is None else np.asarray(start, dtype=np.float64)
        if self.start.shape != (n,) or np.abs(self.start).max(initial=0) > bound:
            raise ValueError(f"start must be {n} weights in [-{bound}, {bound}], got {list(self.start)}")
        self.budget, self.bound, self.l1, self.seed, self.progress = budget, bound, l1, seed, progress
        self.optimizer, self.batch_size, self.max_length = optimizer, batch_size, max_length
        self.tokenizer = tokenizer
        self.model, self.config, factors = _load_pool(base, named)
        self.seq2seq = bool(getattr(self.model.config, "is_encoder_decoder", False))
        # [N, ...] stacks per module and factor, float32: eq. 2 is one tensordot per tensor.
        self._stacks = {
            module: (
                torch.stack([factors[a][module].A.float() for a in self.names]),
                torch.stack([factors[a][module].B.float() for a in self.names]),
            )
            for module in factors[self.names[0]]
        }
        self._targets = {
            name: (m.lora_A[self.ADAPTER].weight, m.lora_B[self.ADAPTER].weight)
            for name, m, _ in lora_layers(self.model, self.ADAPTER)
        }
        self.batches = self.encode(examples)

    # -- the objective ---------------------------------------------------------------------
    def combine(self, weights: Sequence[float]) -> None:
        """Load ``A = sum w_i A_i``, ``B = sum w_i B_i`` (eq. 2) into the model's composed adapter."""
        w = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if w.shape != (len(self.names),):
            raise ValueError(f"expected {len(self.names)} weights ({self.names}), got {list(w.shape)}")
        with torch.no_grad():
            for module, (a_stack, b_stack) in self._stacks.items():
                a, b = self._targets[module]
                a.copy_(torch.tensordot(w, a_stack, dims=1))
                b.copy_(torch.tensordot(w, b_stack, dims=1))

    @torch.inference_mode()
    def loss(self, weights: Sequence[float], examples: Sequence[Example] | None = None) -> float:
        """Mean token cross-entropy of the composition with ``weights`` on ``examples``
        (default: the few-shot examples), without the regulariser. Leaves ``weights`` loaded."""
        self.combine(weights)
        batches = self.batches if examples is None else self.encode(examples)
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for batch in batches:
                if self.seq2seq:
                    logits, labels = self.model(**batch).logits, batch["labels"]
                else:
                    out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
                total += float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum"))
                count += int((labels != -100).sum())
        finally:
            self.model.train(was_training)
        return total / count

    def objective(self, weights: Sequence[float]) -> float:
        """Few-shot loss + ``l1 * mean |w|`` (what the search minimises)."""
        return self.loss(weights) + self.l1 * float(np.abs(np.asarray(weights)).mean())

    # -- the search ------------------------------------------------------------------------
    def fit(self) -> LoraHubResult:
        """Search the weights; return the best evaluated and the composed adapter, loaded in ``model``."""
        import nevergrad as ng  # deferred: nevergrad is an optional extra (flexmoe[lora]) and slow to import

        n = len(self.names)
        if self.optimizer not in ng.optimizers.registry:
            raise ValueError(f"unknown nevergrad optimizer {self.optimizer!r}; e.g. NGOpt, CMA, OnePlusOne, PSO")
        param = ng.p.Array(init=self.start, lower=-self.bound, upper=self.bound)
        param.random_state = np.random.RandomState(self.seed)
        opt = ng.optimizers.registry[self.optimizer](parametrization=param, budget=self.budget)
        history: list[Candidate] = []
        seen: dict[tuple[float, ...], float] = {}

        def evaluate(w: np.ndarray) -> float:
            key = tuple(float(x) for x in np.round(w, 6))
            if key not in seen:  # an optimizer may propose a point twice; it costs nothing then
                loss = self.loss(w)
                seen[key] = loss + self.l1 * float(np.abs(w).mean())
                history.append(Candidate(key, loss, seen[key]))
                bar.update(1)
                bar.set_postfix(best=f"{min(c.objective for c in history):.4f}")
            return seen[key]

        bar = tqdm(total=self.budget, desc="LoraHub", unit="eval", disable=not self.progress or None, file=sys.stderr)
        try:
            with warnings.catch_warnings():
                # scipy's COBYLA (one of NGOpt's choices) warns about a setting nevergrad passes it,
                # and recast optimizers warn when they converge early (then they propose random points).
                warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")
                warnings.filterwarnings("ignore", category=ng.errors.FinishedUnderlyingOptimizerWarning)
                for w in (self.start, np.full(n, 1.0 / n)):
                    value = evaluate(w)
                    # the optimizer may not learn from it; it is still a candidate
                    with contextlib.suppress(ng.errors.TellNotAskedNotSupportedError):
                        opt.tell(opt.parametrization.spawn_child(new_value=w), value)
                asks = 0
                while len(history) < self.budget and asks < 4 * self.budget:
                    candidate = opt.ask()
                    asks += 1
                    opt.tell(candidate, evaluate(np.clip(candidate.value, -self.bound, self.bound)))
        finally:
            bar.close()
            # Recast optimizers (COBYLA, ...) run in a thread that stops only when the optimizer is
            # collected, and the optimizer sits in a reference cycle: collect it now, or the
            # thread keeps waiting and blocks interpreter exit.
            del opt
            gc.collect()
        best = min(history, key=lambda c: c.objective)
        self.combine(best.weights)
        from peft import get_peft_model_state_dict  # deferred: peft is an optional extra (flexmoe[lora])

        # Only the LoRA factors: not the full weights of a targeted lm_head or embedding.
        state = get_peft_model_state_dict(self.model, adapter_name=self.ADAPTER, save_embedding_layers=False)
        adapter = {k: v.detach().clone() for k, v in state.items()}
        return LoraHubResult(
            names=list(self.names),
            weights=list(best.weights),
            loss=best.loss,
            objective=best.objective,
            history=history,
            adapter=adapter,
            config=self.config,
            model=self.model,
        )

    # -- examples --------------------------------------------------------------------------
    def encode(self, examples: Sequence[Example]) -> list[dict[str, torch.Tensor]]:
        """Tokenise examples into padded batches with ``-100`` on tokens that carry no loss."""
        if self.tokenizer is None:
            raise ValueError("LoraHub needs the base model's tokenizer (tokenizer=...) to read the examples")
        if not examples:
            raise ValueError("no examples given")
        rows = [self._encode_one(e, i) for i, e in enumerate(examples)]
        pad = next((t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None), 0)
        batches = []
        for k in range(0, len(rows), self.batch_size):
            chunk = rows[k : k + self.batch_size]
            batches.append(_pad(chunk, pad, self.seq2seq))
        return batches

    def _encode_one(self, example: Example, index: int) -> tuple[list[int], list[int]]:
        def ids(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        if isinstance(example, str):
            if self.seq2seq:
                raise ValueError(f"example {index}: a seq2seq model needs (input, output) pairs, got a string")
            source, target = [], ids(example)
        elif isinstance(example, Mapping):
            if not {"input", "output"} <= set(example):
                raise ValueError(f"example {index}: a mapping needs 'input' and 'output', got {sorted(example)}")
            source, target = ids(example["input"]), ids(example["output"])
        else:
            if len(example) != 2:
                raise ValueError(f"example {index}: expected an (input, output) pair, got {len(example)} items")
            source, target = ids(example[0]), ids(example[1])
        if not target or (not source and len(target) < 2):
            raise ValueError(f"example {index} has no tokens to predict")
        if self.seq2seq:
            if not source:
                raise ValueError(f"example {index}: a seq2seq model needs a non-empty input")
            return source[: self.max_length], target[: self.max_length]
        tokens = (source + target)[-self.max_length :]
        labels = ([-100] * len(source) + target)[-self.max_length :]
        if all(t == -100 for t in labels[1:]):
            raise ValueError(f"example {index}: the output was cut away (max_length={self.max_length})")
        return tokens, labels


def _default_names(sources: Sequence[AdapterSource]) -> dict[str, AdapterSource]:
    names = {}
    for i, src in enumerate(sources):
        name = Path(src).name if isinstance(src, (str, os.PathLike)) else f"adapter_{i}"
        names[name if name not in names and name != LoraHub.ADAPTER else f"adapter_{i}"] = src
    return names


def _load_pool(base: nn.Module, named: dict[str, AdapterSource]):
    """One ``peft`` model holding every pool adapter, read out as factors, plus the composed
    adapter (``LoraHub.ADAPTER``, active); the pool adapters are then deleted from the model."""
    # deferred: peft is an optional extra (flexmoe[lora])
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if isinstance(base, PeftModel):
        raise TypeError("LoraHub takes the plain base model; pass peft models as adapters")
    if LoraHub.ADAPTER in named:
        raise ValueError(f"{LoraHub.ADAPTER!r} is reserved for the composed adapter; rename that adapter")
    model = None
    configs = {}
    for name, src in named.items():
        if isinstance(src, PeftModel):
            active = src.active_adapter
            config = copy.deepcopy(src.peft_config[active])
            config.inference_mode = True
            if model is None:
                model = get_peft_model(base, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            state = get_peft_model_state_dict(src, adapter_name=active, save_embedding_layers=False)
            set_peft_model_state_dict(model, state, adapter_name=name)
        elif isinstance(src, (str, os.PathLike)):
            path = check_peft_dir(src)
            if model is None:
                model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
            else:
                model.load_adapter(str(path), adapter_name=name)
        else:
            raise TypeError(
                f"adapter {name!r}: expected a peft adapter directory or a peft model, got {type(src).__name__}"
            )
        configs[name] = model.peft_config[name]
        if configs[name].peft_type.value != "LORA":
            raise ValueError(f"adapter {name!r} is {configs[name].peft_type.value}, not LoRA")
    factors = {name: lora_factors(model, name) for name in named}
    _check_compatible(factors)
    first = next(iter(named))
    config = copy.deepcopy(configs[first])
    config.inference_mode = True
    model.add_adapter(LoraHub.ADAPTER, config)
    model.set_adapter(LoraHub.ADAPTER)
    for name in named:
        model.delete_adapter(name)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), config, factors


def _check_compatible(factors: dict[str, dict[str, LoraFactors]]) -> None:
    names = list(factors)
    ref_name, ref = names[0], factors[names[0]]
    for name in names[1:]:
        got = factors[name]
        if set(got) != set(ref):
            raise ValueError(
                f"adapter {name!r} adapts other modules than {ref_name!r}: missing {sorted(set(ref) - set(got))[:3]}, "
                f"extra {sorted(set(got) - set(ref))[:3]}; LoraHub combines adapters of the same modules"
            )
        for module, f in got.items():
            r = ref[module]
            if f.A.shape != r.A.shape or f.B.shape != r.B.shape or not math.isclose(f.scaling, r.scaling):
                raise ValueError(
                    f"adapter {name!r}, module {module!r}: A {list(f.A.shape)}, B {list(f.B.shape)}, scaling "
                    f"{f.scaling} differ from {ref_name!r} (A {list(r.A.shape)}, B {list(r.B.shape)}, scaling "
                    f"{r.scaling}); LoraHub combines adapters of the same rank and alpha"
                )


def _pad(rows: list[tuple[list[int], list[int]]], pad: int, seq2seq: bool) -> dict[str, torch.Tensor]:
    if seq2seq:
        n_in, n_out = max(len(s) for s, _ in rows), max(len(t) for _, t in rows)
        ids = torch.full((len(rows), n_in), pad)
        mask = torch.zeros((len(rows), n_in), dtype=torch.long)
        labels = torch.full((len(rows), n_out), -100)
        for i, (s, t) in enumerate(rows):
            ids[i, : len(s)], mask[i, : len(s)], labels[i, : len(t)] = torch.tensor(s), 1, torch.tensor(t)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    width = max(len(t) for t, _ in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (t, lab) in enumerate(rows):
        ids[i, : len(t)], mask[i, : len(t)], labels[i, : len(t)] = torch.tensor(t), 1, torch.tensor(lab)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
