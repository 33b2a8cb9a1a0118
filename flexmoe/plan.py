"""How much memory an owner's training run needs, before it runs (``flexmoe plan``).

An owner trains one expert against the frozen public model (FlexOlmo section 3.2,
:class:`~flexmoe.training.expert.ExpertModule`): the public model is upcycled to two experts
per layer, and only expert 1 (a copy of the public MLP) and the layer's router tensor train.
So what a device holds is lopsided: every public weight, once, but gradients and AdamW's two
moments only for the expert and the routers. This module prices each part from the model's
shape (a ``transformers`` config; no weight is loaded) and the spec's
:class:`~flexmoe.spec.ExpertRecipe`, and finds the settings (micro-batch, activation
checkpointing, FSDP) that fit a memory budget.

The parts, per device, for ``T`` tokens in a micro-batch:

* **frozen weights**: the public model (embeddings, attention, norms, expert 0, LM head);
* **trainable weights**: expert 1 and the routers, in float32 (the master copy AdamW steps);
  under ``bf16-mixed`` also their bfloat16 cast, which autocast keeps for the backward pass;
* **gradients**: float32, one per trainable weight;
* **optimizer state**: AdamW's ``exp_avg`` and ``exp_avg_sq``, float32;
* **activations**: what autograd saves for the backward pass, counted per token below, plus the
  logits and their log-softmax (``2 V`` per token); with checkpointing, one ``H`` per layer
  (each decoder layer's input) plus the larger of the logits and one recomputed layer;
* **step workspace**: AdamW's temporaries while it steps (on CUDA ``torch.optim.AdamW`` runs its
  ``foreach`` kernels, which hold one float32 copy of everything that trains; on the CPU it
  steps tensor by tensor, one tensor's worth), taken after the activations are freed.

Peak = weights + gradients + optimizer state + max(activations, step workspace). All four are
live at once because Lightning's automatic optimisation clears the previous step's gradients
after the forward pass (``zero_grad`` runs between ``training_step`` and ``backward``), so the
forward pass of step ``n`` runs with step ``n - 1``'s gradients still held.

The saved-activation counts are OLMo-2's decoder layer under the owner's recipe, read off
``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded), in elements per token:

* a decoder layer the gradient flows through: ``q`` and ``k`` norms' inputs, SDPA's ``q, k, v``
  and output (and one log-sum-exp per head), the two residual-branch norms' inputs, the router's
  input, both experts' weighted outputs, expert 0's ``gate``, ``silu(gate)`` and ``up`` and
  expert 1's same three plus its ``down`` input: ``2 q + 2 kv + (q + kv) + heads + 5 H + 7 I``
  (``11 H + 7 I + heads`` when ``kv = q = H``);
* the first layer: its attention sits below any trainable weight, so only the MoE and the norm
  after it save anything: ``4 H + 4 I``;
* the final norm's input (``H``) and RoPE's ``cos``/``sin`` (``2 head_dim``).

Llama-style layers (pre-norms, no ``q``/``k`` norm) are priced with the same rule. docs/scale.md
compares the predictions with measured peaks.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flexmoe.core.errors import InputError
from flexmoe.core.parsing import load_json, read_json
from flexmoe.spec import ExpertRecipe

GiB = 2**30
Precision = Literal["32-true", "bf16-mixed"]  # the recipe's flexmoe.spec.PRECISIONS (tests/test_plan.py)
Device = Literal["cuda", "cpu"]

# Shapes of real public models, written down from their published configs, so a plan needs no
# download. The 150M size is the OLMo-2 ladder's smallest common shape with the OLMo-2 vocabulary.
_OLMO2 = {"model_type": "olmo2", "vocab_size": 100352, "tie_word_embeddings": False}
KNOWN_CONFIGS: dict[str, dict] = {
    "olmo2-150m": {**_OLMO2, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "num_key_value_heads": 12},
    "olmo2-1b": {**_OLMO2, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 16, "num_key_value_heads": 16},
    "olmo2-7b": {**_OLMO2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32},
    "olmo2-13b": {**_OLMO2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "num_key_value_heads": 40},
}  # fmt: skip

# Families whose attention normalises q and k over the full projection (OLMo-2's QK-norm).
_QK_NORM = ("olmo2", "flex_olmo")
# The CUDA context, cuBLAS workspaces and the caching allocator's slack: a fixed allowance, not a
# measurement (no GPU has checked it yet; docs/scale.md).
CUDA_RUNTIME_BYTES = 1 * GiB
_BYTES = {"32-true": (4, 4), "bf16-mixed": (2, 2)}  # (frozen weights, activations) bytes per element


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only public model: all a plan reads of its config."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a ``transformers`` config object or its dictionary (``config.json``'s fields)."""
        d = config if isinstance(config, Mapping) else config.to_dict()
        try:
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            kv = d.get("num_key_value_heads") or heads
            return cls(
                model_type=str(d.get("model_type", "")),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(kv),
                head_dim=int(d.get("head_dim") or hidden // heads),
                vocab_size=int(d["vocab_size"]),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise InputError(f"the model config has no {e.args[0]!r}: a plan needs a decoder's config.json") from None

    def with_layers(self, num_layers: int) -> ModelShape:
        """The same model with ``num_layers`` decoder layers (the measurements' shortened 7B)."""
        return dataclasses.replace(self, num_layers=num_layers)

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_params(self) -> int:
        """One gated MLP (gate, up, down): what an expert holds per layer."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def layer_params(self) -> int:
        """One dense decoder layer: attention, its norms and the MLP."""
        h, q, kv = self.hidden_size, self.q_width, self.kv_width
        attention = 2 * h * q + 2 * h * kv + (q + kv if self.model_type in _QK_NORM else 0)
        return attention + 2 * h + self.mlp_params

    @property
    def dense_params(self) -> int:
        """The public model's parameter count."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_layers * self.layer_params + self.hidden_size

    @property
    def trainable_params(self) -> int:
        """What an owner trains: expert 1 and each layer's router tensor (``[2, H]`` and ``[2]``;
        the frozen row shares the tensor, so it is stored and stepped too)."""
        return self.num_layers * (self.mlp_params + 2 * self.hidden_size + 2)

    def saved_per_token(self, precision: Precision = "32-true") -> tuple[float, float, float]:
        """Bytes autograd saves per token: ``(one inner layer, the first layer, the rest)``.

        The counts are in this module's docstring. Under ``bf16-mixed`` the norms' inputs are
        saved in float32 (RMSNorm upcasts before it normalises), everything else in bfloat16."""
        act = _BYTES[precision][1]
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_width, self.kv_width
        qk_norm = self.model_type in _QK_NORM
        norms = (q + kv if qk_norm else 0) + 2 * h  # saved in float32
        other = 2 * q + 2 * kv + 3 * h + 7 * i  # SDPA, router input, weighted expert outputs, MLPs
        inner = 4 * norms + act * other + 4 * self.num_heads
        first = 4 * h + act * (3 * h + 4 * i)
        rest = 4 * h + act * 2 * self.head_dim
        return inner, first, rest

    def logits_per_token(self, precision: Precision = "32-true") -> int:
        """Bytes of the logits while the loss is computed: the logits and their float32
        log-softmax; under ``bf16-mixed`` also the loss's float32 upcast of the logits."""
        return self.vocab_size * (8 if precision == "32-true" else 10)


@dataclass(frozen=True)
class Setting:
    """One way to run the owner's step on ``devices`` devices."""

    micro_batch: int
    seq_len: int
    checkpointing: bool = False
    fsdp: bool = False
    devices: int = 1
    precision: Precision = "bf16-mixed"
    device: Device = "cuda"


@dataclass(frozen=True)
class MemoryEstimate:
    """Expected peak memory of one device, in bytes, by part."""

    setting: Setting
    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    step_workspace: int
    runtime: int
    activations_per_token: int
    activations_per_token_checkpointed: int

    @property
    def peak(self) -> int:
        states = self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer_state
        return states + max(self.activations, self.step_workspace) + self.runtime

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak": self.peak}


def estimate(shape: ModelShape, setting: Setting) -> MemoryEstimate:
    """Expected peak memory per device of the owner's training step under ``setting``."""
    s = setting
    frozen_bytes = _BYTES[s.precision][0]
    frozen = shape.dense_params * frozen_bytes
    trainable = shape.trainable_params
    # float32 master weights; under bf16-mixed, autocast's bfloat16 cast lives until the backward pass.
    weights = trainable * (4 if s.precision == "32-true" else 6)
    grads, moments = 4 * trainable, 8 * trainable
    layer_working = 0
    if s.fsdp and s.devices > 1:
        # FSDP2 (ExpertModule.fsdp_strategy): every parameter, gradient and moment is split over the
        # devices; a layer's units are gathered whole while it runs (and the next one's prefetched).
        frozen, weights, grads, moments = (math.ceil(x / s.devices) for x in (frozen, weights, grads, moments))
        layer_working = 2 * (shape.layer_params * frozen_bytes + (shape.mlp_params + 2 * shape.hidden_size) * 4)
        # The root unit (embeddings, final norm, LM head) stays gathered from its forward pass to
        # its backward: whole, less the shard already counted.
        root = shape.dense_params - shape.num_layers * shape.layer_params
        layer_working += math.ceil(root * frozen_bytes * (1 - 1 / s.devices))
    elif s.devices > 1:
        grads *= 2  # DDP's gradient buckets hold a second copy of what trains

    inner, first, rest = shape.saved_per_token(s.precision)
    full = (shape.num_layers - 1) * inner + first + rest + shape.logits_per_token(s.precision)
    act = _BYTES[s.precision][1]
    checkpointed = shape.num_layers * act * shape.hidden_size + rest + max(shape.logits_per_token(s.precision), inner)
    tokens = s.micro_batch * s.seq_len
    activations = tokens * (checkpointed if s.checkpointing else full) + layer_working

    largest = shape.hidden_size * shape.intermediate_size * 4
    workspace = math.ceil(4 * shape.trainable_params / (s.devices if s.fsdp else 1)) if s.device == "cuda" else largest
    return MemoryEstimate(
        setting=s,
        frozen_weights=int(frozen),
        trainable_weights=int(weights),
        gradients=int(grads),
        optimizer_state=int(moments),
        activations=int(activations),
        step_workspace=int(workspace),
        runtime=CUDA_RUNTIME_BYTES if s.device == "cuda" else 0,
        activations_per_token=int(full),
        activations_per_token_checkpointed=int(checkpointed),
    )


@dataclass(frozen=True)
class Plan:
    """A model, the recipe's batch, a budget, and what fits it."""

    model: str
    shape: ModelShape
    batch_size: int
    seq_len: int
    devices: int
    memory: int | None
    estimates: list[MemoryEstimate]  # the recipe's batch on one micro-batch, each way to run it
    fits: list[MemoryEstimate]  # per way to run it, the largest micro-batch that fits (if any)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "shape": dataclasses.asdict(self.shape),
            "dense_params": self.shape.dense_params,
            "trainable_params": self.shape.trainable_params,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "devices": self.devices,
            "memory": self.memory,
            "estimates": [e.to_dict() for e in self.estimates],
            "fits": [e.to_dict() for e in self.fits],
        }


def plan(
    shape: ModelShape,
    recipe: ExpertRecipe,
    *,
    memory: int | None = None,
    devices: int = 1,
    precision: Precision = "bf16-mixed",
    device: Device = "cuda",
    model: str = "",
) -> Plan:
    """Estimates for the recipe's whole batch per device, with and without checkpointing and
    FSDP, and, for a budget of ``memory`` bytes per device, the largest micro-batch (a power of two
    up to the recipe's batch per device; gradient accumulation makes up the rest) that fits each
    way, or, where even one row does not fit, the longest power-of-two sequence that does."""
    if devices < 1:
        raise InputError(f"devices must be at least 1, got {devices}")
    per_device = max(1, math.ceil(recipe.batch_size / devices))
    ways = [(c, f) for f in ((False, True) if devices > 1 else (False,)) for c in (False, True)]
    common = {"devices": devices, "precision": precision, "device": device}
    estimates = [
        estimate(shape, Setting(per_device, recipe.seq_len, checkpointing=c, fsdp=f, **common)) for c, f in ways
    ]
    fits = []
    if memory is not None:
        for c, f in ways:
            found = None
            for seq_len, batches in [(recipe.seq_len, _powers_up_to(per_device))] + [
                (s, [1]) for s in reversed(_powers_up_to(recipe.seq_len // 2))
            ]:
                for b in reversed(batches):
                    e = estimate(shape, Setting(b, seq_len, checkpointing=c, fsdp=f, **common))
                    if e.peak <= memory:
                        found = e
                        break
                if found:
                    break
            if found:
                fits.append(found)
    return Plan(model, shape, recipe.batch_size, recipe.seq_len, devices, memory, estimates, fits)


def _powers_up_to(n: int) -> list[int]:
    return [2**k for k in range(int(math.log2(max(n, 1))) + 1)]


def model_shape(model: str) -> ModelShape:
    """The shape of ``model``: a name in :data:`KNOWN_CONFIGS`, a ``transformers`` model
    directory (its ``config.json``) or a config JSON file."""
    if model in KNOWN_CONFIGS:
        return ModelShape.from_config(KNOWN_CONFIGS[model])
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} has no config.json: give a transformers model directory or a config file")
        return ModelShape.from_config(read_json(path, "config.json", what=f"{path}/config.json"))
    if path.is_file():
        return ModelShape.from_config(load_json(path.read_bytes(), what=str(path)))
    raise InputError(
        f"no model {model!r}: give a transformers model directory, a config.json, or one of {sorted(KNOWN_CONFIGS)}"
    )


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_memory(text: str) -> int:
    """``"80GB"`` (10^9 bytes), ``"80GiB"`` (2^30), ``"512MB"``... as bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise InputError(f"memory {text!r}: expected a size such as 80GB, 80GiB or 24000MB")
    return int(float(m.group(1)) * _UNITS[unit])
