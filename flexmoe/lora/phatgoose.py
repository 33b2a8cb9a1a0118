"""PHATGOOSE: route every token, in every module, among independently trained LoRA adapters.

Muqeeth et al., 2024 ("Learning to Route Among Specialized Experts for Zero-Shot
Generalization", arXiv 2402.05859), section 3:

1. Each contributor trains a LoRA adapter, freezes it, and trains one **gate vector** ``v`` per
   LoRA module (initialised to 0, ~100 steps on the same data) so that the module computes
   ``W x + LoRA(x) * sigmoid(v . x)`` (:func:`train_gates`).
2. At inference, in every module, each token ``x`` scores the adapters by
   ``softmax_j( LN(x) . LN(v_j) / sqrt(d) )`` (LN: standardisation without learned parameters),
   keeps the top ``k = 2``, renormalises their weights and adds the weighted LoRA outputs
   (:class:`Phatgoose`).

>>> gated = [train_gates(peft_model_i, texts_i, steps=100, tokenizer=tok) for ...]
>>> model = Phatgoose(base, gated, top_k=2)
>>> model(ids).logits; model.generate(ids, max_new_tokens=20)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from flexmoe.artifacts.guard import DEFAULT_MAX_BYTES, ArtifactError, read_safetensors_header
from flexmoe.artifacts.peft_adapters import LoraFactors, active_adapter, lora_factors, lora_layers
from flexmoe.core.io import atomic_file
from flexmoe.data.packing import pack_domain

GATED_FORMAT = "flexmoe.gated_lora"
GATED_FORMAT_VERSION = "1"
_GATED_KEY = re.compile(r"^(.+)\.(lora_A|lora_B|gate|scaling)$")


@dataclass
class GatedAdapter:
    """A frozen LoRA adapter and its PHATGOOSE gate vectors, by module name (as in the base model)."""

    name: str
    modules: dict[str, LoraFactors] = field(repr=False)
    gates: dict[str, torch.Tensor] = field(repr=False)

    def __post_init__(self):
        if set(self.modules) != set(self.gates):
            raise ValueError(
                f"gated adapter {self.name!r}: modules without a gate "
                f"{sorted(set(self.modules) - set(self.gates))[:3]}, gates without a module "
                f"{sorted(set(self.gates) - set(self.modules))[:3]}"
            )
        for module, f in self.modules.items():
            if list(self.gates[module].shape) != [f.A.shape[1]]:
                raise ValueError(
                    f"gated adapter {self.name!r}, module {module!r}: gate shape "
                    f"{list(self.gates[module].shape)}, expected [{f.A.shape[1]}] (the input width)"
                )

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file: ``{module}.lora_A``, ``.lora_B``, ``.gate``, ``.scaling`` per module."""
        tensors = {}
        for module, f in self.modules.items():
            tensors[f"{module}.lora_A"] = f.A.contiguous()
            tensors[f"{module}.lora_B"] = f.B.contiguous()
            tensors[f"{module}.gate"] = self.gates[module].contiguous()
            tensors[f"{module}.scaling"] = torch.tensor([f.scaling], dtype=torch.float32)
        path = Path(path)
        meta = {"format": GATED_FORMAT, "format_version": GATED_FORMAT_VERSION, "owner": self.name}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES) -> GatedAdapter:
        """Read a file written by :meth:`save`; untrusted bytes are checked first (never unpickled)."""
        path = Path(path)
        header = read_safetensors_header(path, max_bytes=max_bytes)
        meta = header.pop("__metadata__", None) or {}
        name = meta.get("owner", path.name)

        def error(what, expected, got):
            return ArtifactError(name, what, expected, got, source=path)

        for key, want in (("format", GATED_FORMAT), ("format_version", GATED_FORMAT_VERSION)):
            if meta.get(key) != want:
                raise error(f"metadata {key!r}", want, meta.get(key))
        parts: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(path), framework="pt") as f:
            for key in sorted(f.keys()):
                m = _GATED_KEY.match(key)
                if m is None:
                    raise error("tensor names", "{module}.lora_A / lora_B / gate / scaling", key)
                t = f.get_tensor(key)
                if not t.is_floating_point() or not torch.isfinite(t).all():
                    raise error(f"values of {key}", "finite floating-point numbers", f"{t.dtype} with NaN/Inf or ints")
                parts.setdefault(m.group(1), {})[m.group(2)] = t
        modules, gates = {}, {}
        for module, p in parts.items():
            if set(p) != {"lora_A", "lora_B", "gate", "scaling"}:
                raise error(f"tensors of module {module!r}", ["gate", "lora_A", "lora_B", "scaling"], sorted(p))
            if p["scaling"].shape != (1,):
                raise error(f"shape of {module}.scaling", [1], list(p["scaling"].shape))
            try:
                modules[module] = LoraFactors(p["lora_A"], p["lora_B"], float(p["scaling"]))
            except ValueError as e:
                raise error(f"shapes of module {module!r}", "A [r, in] and B [out, r]", str(e)) from e
            gates[module] = p["gate"]
        if not modules:
            raise error("tensors", "at least one module", "none")
        try:
            return cls(name, modules, gates)
        except ValueError as e:
            raise error("gate shapes", "[in] per module", str(e)) from e


# -- 1. training the gates ------------------------------------------------------------------


class _Gate:
    """``LoRA(x) * sigmoid(v . x)`` on one peft LoRA layer, through hooks (the layer is unchanged)."""

    def __init__(self, layer: nn.Module, adapter: str, v: torch.Tensor):
        self.v, self.x = v, None
        self.handles = [
            layer.register_forward_pre_hook(self._keep_input, with_kwargs=True),
            layer.lora_B[adapter].register_forward_hook(self._gate),
        ]

    def _keep_input(self, module, args, kwargs):
        self.x = args[0] if args else kwargs["x"]

    def _gate(self, module, args, out):
        g = torch.sigmoid(self.x.to(self.v.dtype) @ self.v)
        return out * g.unsqueeze(-1).to(out.dtype)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.x = None


@contextlib.contextmanager
def gated(
    model_with_lora: nn.Module, gates: dict[str, torch.Tensor], adapter: str | None = None
) -> Iterator[nn.Module]:
    """Within the block, every LoRA module of ``adapter`` computes ``W x + LoRA(x) * sigmoid(v . x)``
    with ``v = gates[module name]`` (PHATGOOSE's gated module, section 3.1); restored on exit."""
    adapter = adapter or active_adapter(model_with_lora)
    layers = {n: m for n, m, _ in lora_layers(model_with_lora, adapter)}
    if set(gates) != set(layers):
        missing, extra = sorted(set(layers) - set(gates))[:3], sorted(set(gates) - set(layers))[:3]
        raise ValueError(
            f"gates for {len(gates)} modules but adapter {adapter!r} has {len(layers)} LoRA modules; "
            f"missing {missing}, extra {extra}"
        )
    hooks = [_Gate(layers[n], adapter, v) for n, v in gates.items()]
    try:
        yield model_with_lora
    finally:
        for h in hooks:
            h.remove()


def train_gates(
    model_with_lora: nn.Module,
    data,
    steps: int = 100,
    *,
    tokenizer=None,
    adapter: str | None = None,
    name: str | None = None,
    lr: float = 1e-3,
    batch_size: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> GatedAdapter:
    """Train PHATGOOSE gate vectors for the (frozen) LoRA adapter of a ``peft`` model.

    Every LoRA module's output becomes ``LoRA(x) * sigmoid(v . x)`` with ``v`` (one per module,
    ``[in_features]``) initialised to 0 (:func:`gated`); only the ``v`` train (Adam, lr 1e-3 by
    default), on the language-modelling loss over ``data``, for ``steps`` steps. The model is left
    as it was (hooks removed, ``requires_grad`` restored).

    Args:
        model_with_lora: a ``peft`` model (or a model with peft LoRA layers injected).
        data: documents (a list of strings; needs ``tokenizer``; packed into ``seq_len`` rows),
            packed token ids ``[N, S]``, or an iterable of batches (``{"input_ids": ...}`` or
            tensors), cycled as needed.
        adapter: which adapter (default: the single active one).
        name: the returned adapter's name (default: ``adapter``).
    Returns the :class:`GatedAdapter` (LoRA factors and gates, detached copies).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    adapter = adapter or active_adapter(model_with_lora)
    device = next(model_with_lora.parameters()).device
    layers = lora_layers(model_with_lora, adapter)
    gates = {n: nn.Parameter(torch.zeros(m.in_features, device=device)) for n, m, _ in layers}
    trainable = {p: p.requires_grad for p in model_with_lora.parameters()}
    was_training = model_with_lora.training
    batches = _batches(data, tokenizer, seq_len, batch_size, seed)
    opt = torch.optim.AdamW(gates.values(), lr=lr, weight_decay=0.0)
    try:
        for p in trainable:
            p.requires_grad_(False)
        model_with_lora.train()
        with gated(model_with_lora, gates, adapter):
            bar = tqdm(range(steps), desc=f"gates {name or adapter}", disable=not progress or None, file=sys.stderr)
            for _ in bar:
                ids = next(batches).to(device)
                loss = model_with_lora(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model_with_lora.train(was_training)
    factors = lora_factors(model_with_lora, adapter)
    return GatedAdapter(name or adapter, factors, {n: v.detach().clone() for n, v in gates.items()})


def _batches(data, tokenizer, seq_len: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of token ids from documents, packed rows or a loader."""
    if isinstance(data, (str, os.PathLike)) or (
        isinstance(data, Sequence) and data and all(isinstance(d, str) for d in data)
    ):
        if tokenizer is None:
            raise ValueError("documents given as text need the model's tokenizer (tokenizer=...)")
        data = pack_domain(list(data), tokenizer, seq_len)
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.shape[0] == 0:
            raise ValueError(f"packed token ids must be [N, S] with N >= 1, got {list(data.shape)}")
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(data.shape[0], generator=g)
            for k in range(0, len(order), batch_size):
                yield data[order[k : k + batch_size]].long()
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be documents, a [N, S] tensor of token ids or an iterable of batches, got {type(data)}"
        )
    for batch in itertools.cycle(data) if isinstance(data, Sequence) else _repeat(data):
        yield (batch["input_ids"] if isinstance(batch, dict) else batch).long()


def _repeat(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data loader yielded no batches")


# -- 2. routing among the gated adapters ----------------------------------------------------


@dataclass
class PhatgooseSettings:
    """Shared by every routed module of one :class:`Phatgoose` model."""

    top_k: int = 2
    # Set by Phatgoose.record_routing(): every module appends (name, top-1 adapter per token).
    recorded: list[tuple[str, torch.Tensor]] | None = field(default=None, repr=False)


class PhatgooseLinear(nn.Module):
    """A linear layer plus the routed sum of the LoRA updates of the adapters that adapt it.

    ``y = W x + sum_{j in top-k} p_j * scaling_j * B_j A_j x`` with ``p = softmax(LN(x) . LN(v_j) / sqrt(d))``
    renormalised over the top-k. All adapters run on every token (LoRA is cheap next to ``W``);
    the routing weights zero the ones not chosen. Ranks may differ: factors are zero-padded.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        factors: list[LoraFactors],
        gates: list[torch.Tensor],
        experts: list[int],
        settings: PhatgooseSettings,
        name: str = "",
    ):
        super().__init__()
        self.base_layer, self.settings, self.name = base_layer, settings, name
        n, d_in, d_out = len(factors), base_layer.in_features, base_layer.out_features
        r = max(f.rank for f in factors)
        A, B = torch.zeros(n, r, d_in), torch.zeros(n, d_out, r)
        for j, f in enumerate(factors):
            if f.A.shape[1] != d_in or f.B.shape[0] != d_out:
                raise ValueError(
                    f"module {name!r}: adapter {experts[j]} has A {list(f.A.shape)}, B {list(f.B.shape)} "
                    f"but the layer maps {d_in} -> {d_out}"
                )
            A[j, : f.rank], B[j, :, : f.rank] = f.A.float(), f.B.float()
        device = base_layer.weight.device
        self.register_buffer("lora_A", A.to(device), persistent=False)
        self.register_buffer("lora_B", B.to(device), persistent=False)
        self.register_buffer("scaling", torch.tensor([f.scaling for f in factors], device=device), persistent=False)
        v = torch.stack([g.float() for g in gates]).to(device)
        self.register_buffer("gates", F.layer_norm(v, (d_in,)), persistent=False)  # LN(v_j), fixed
        self.register_buffer("experts", torch.tensor(experts, device=device), persistent=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probabilities [..., N], renormalised top-k weights scattered to [..., N])``."""
        d = x.shape[-1]
        probs = torch.softmax(F.layer_norm(x.float(), (d,)) @ self.gates.T / math.sqrt(d), dim=-1)
        w, idx = torch.topk(probs, min(self.settings.top_k, probs.shape[-1]), dim=-1)
        return probs, torch.zeros_like(probs).scatter(-1, idx, w / w.sum(-1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        probs, weights = self.route(x)
        if self.settings.recorded is not None:
            self.settings.recorded.append((self.name, self.experts[probs.argmax(-1)]))
        z = torch.einsum("...i,nri->...nr", x.float(), self.lora_A) * (weights * self.scaling)[..., None]
        return out + torch.einsum("...nr,nor->...o", z, self.lora_B).to(out.dtype)


class Phatgoose(nn.Module):
    """``base`` with every module that any gated adapter adapts routed among them (in place).

    Forward, evaluation and ``generate`` are the base model's own. ``top_k`` (default 2, as in
    the paper) can be changed later through ``settings.top_k``.
    """

    def __init__(self, base: nn.Module, gated_adapters: Sequence[GatedAdapter], top_k: int = 2):
        super().__init__()
        names = [g.name for g in gated_adapters]
        if not names:
            raise ValueError("Phatgoose needs at least one gated adapter")
        if len(set(names)) != len(names):
            raise ValueError(f"gated adapter names must be unique, got {names}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if any(isinstance(m, PhatgooseLinear) or hasattr(m, "lora_A") for m in base.modules()):
            raise ValueError("the base model already holds LoRA or Phatgoose layers; pass the plain base model")
        self.names = names
        self.settings = PhatgooseSettings(top_k=top_k)
        modules = sorted({m for g in gated_adapters for m in g.modules})
        for module in modules:
            try:
                linear = base.get_submodule(module)
            except AttributeError as e:
                raise ValueError(f"the base model has no module {module!r} (adapted by a gated adapter)") from e
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"module {module!r} of the base model is a {type(linear).__name__}, not nn.Linear")
            members = [j for j, g in enumerate(gated_adapters) if module in g.modules]
            routed = PhatgooseLinear(
                linear,
                [gated_adapters[j].modules[module] for j in members],
                [gated_adapters[j].gates[module] for j in members],
                members,
                self.settings,
                module,
            )
            parent, _, attr = module.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, attr, routed)
        self.model = base

    @property
    def config(self):
        return self.model.config

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def record_routing(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Collect ``(module name, top-1 adapter index per token)`` from every routed module."""
        recorded: list[tuple[str, torch.Tensor]] = []
        previous, self.settings.recorded = self.settings.recorded, recorded
        try:
            yield recorded
        finally:
            self.settings.recorded = previous

    @torch.inference_mode()
    def top1_shares(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, float]:
        """Share of (token, module) pairs whose highest-scoring adapter is each adapter."""
        with self.record_routing() as recorded:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        keep = None if attention_mask is None else attention_mask.bool()
        counts = torch.zeros(len(self.names))
        for _, top1 in recorded:
            chosen = top1[keep] if keep is not None else top1.reshape(-1)
            counts += torch.bincount(chosen.reshape(-1).cpu(), minlength=len(self.names)).float()
        return dict(zip(self.names, (counts / counts.sum()).tolist()))
