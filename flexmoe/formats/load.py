"""Open a merged model from disk as a flexmoe MoE: native and remote exports, FlexOlmo and Mixtral checkpoints.

A FlexOlmo or Mixtral checkpoint (flexmoe's own export or an official one) is rebuilt as the
flexmoe MoE that computes the same logits, so an official FlexOlmo model can take ``opt_out``
and ``add_expert`` like any merged model; a dense model is returned as it is. It reads the names
and configs :mod:`flexmoe.formats.export` writes, and so sits on the same floor, above it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedConfig,
)
from transformers.initialization import no_init_weights

from flexmoe.core import posterior  # noqa: F401  (registers the library's "posterior" router kind)
from flexmoe.core.errors import InputError
from flexmoe.core.moe import Router, router_class
from flexmoe.core.surgery import PUBLIC, decoder_layers, moe_blocks, set_top_k, upcycle
from flexmoe.formats.export import (
    BASE_CONFIG,
    FLEXMOE_CONFIG,
    INDEX,
    NATIVE_VERSION,
    dense_config,
    dense_tensors,
    mlp_prefixes,
)


def load(path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Open a native or remote flexmoe export, a FlexOlmo or Mixtral checkpoint (as a flexmoe MoE that
    supports ``opt_out``/``add_expert``), or a dense ``transformers`` model (returned as is)."""
    path = Path(path)
    meta = json.loads((path / FLEXMOE_CONFIG).read_text()) if (path / FLEXMOE_CONFIG).is_file() else None
    if meta is not None and meta.get("format") in ("native", "remote"):
        # A remote export is the native layout plus config.json and modeling code; flexmoe reads the layout.
        return _load_native(path, meta, dtype)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds neither a flexmoe export ({FLEXMOE_CONFIG}) nor a config.json")
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    if model.config.model_type not in ("flex_olmo", "mixtral"):
        return model
    return _from_hf_moe(model, meta)


def _load_native(path: Path, meta: dict, dtype) -> nn.Module:
    if meta.get("format_version") != NATIVE_VERSION:
        raise ValueError(
            f"{path}: {meta['format']} format version {meta.get('format_version')!r}, "
            f"this flexmoe reads version {NATIVE_VERSION}"
        )
    config = AutoConfig.from_pretrained(path / BASE_CONFIG)
    dtype = dtype or getattr(torch, str(config.dtype or "float32").removeprefix("torch."))
    owners = meta["owners"]
    model = _empty_model(config, dtype)
    upcycle(model, len(owners) - 1, owners=owners[1:], normalize=meta["normalize"])
    set_top_k(model, meta["top_k"])
    index = json.loads((path / INDEX).read_text())["weight_map"]
    _load_routers(model, path, index, meta.get("router", Router.kind), dtype)
    expected = dict(dense_tensors(model, []))
    if set(index) != set(expected):
        missing, extra = sorted(set(expected) - set(index)), sorted(set(index) - set(expected))
        raise ValueError(
            f"{path}: tensors do not match a {config.model_type} MoE with {len(owners)} experts; "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    with torch.no_grad():
        for shard in sorted(set(index.values())):
            with safe_open(str(path / shard), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    target = expected[key]
                    value = f.get_tensor(key)
                    if value.shape != target.shape:
                        raise ValueError(
                            f"{path / shard}: {key} has shape {list(value.shape)}, "
                            f"the model expects {list(target.shape)}"
                        )
                    target.copy_(value)
    for block in moe_blocks(model):  # routers that share state across layers reconnect it
        block.router.attach(model)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def _load_routers(model: nn.Module, path: Path, index: dict[str, str], kinds: str | list[str], dtype) -> None:
    """Give every layer the router the export recorded: its class by ``kind`` (one for all layers,
    or one per layer) and its state from the tensors under ``...mlp.router.*``."""
    blocks = moe_blocks(model)
    kinds = [kinds] * len(blocks) if isinstance(kinds, str) else list(kinds)
    if len(kinds) != len(blocks):
        raise InputError(f"{path}: {FLEXMOE_CONFIG} names {len(kinds)} router kinds for {len(blocks)} layers")
    try:
        classes = [router_class(kind) for kind in kinds]
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    layer_of = {prefix: L for L, prefix in enumerate(mlp_prefixes(model))}
    states: list[dict[str, torch.Tensor]] = [{} for _ in blocks]
    wanted: dict[str, list[tuple[str, int, str]]] = {}  # shard -> (key, layer, name in the router)
    for key, shard in index.items():
        head, sep, name = key.partition(".router.")
        if sep and head in layer_of:
            wanted.setdefault(shard, []).append((key, layer_of[head], name))
    for shard, keys in wanted.items():
        with safe_open(str(path / shard), framework="pt") as f:
            for key, L, name in keys:
                states[L][name] = f.get_tensor(key)
    for L, (block, cls, state) in enumerate(zip(blocks, classes, states)):
        try:
            block.router = cls.from_native_state(state, dtype=dtype)
        except KeyError as e:
            raise InputError(
                f"{path}: layer {L}'s {cls.kind} router has no tensor {e} (found {sorted(state)})"
            ) from None


def _empty_model(config: PreTrainedConfig, dtype: torch.dtype) -> nn.Module:
    """A dense model of ``config`` whose weights are about to be overwritten (no random init)."""
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights skips the tying that normally happens at init
    return model.eval()


def _from_hf_moe(hf: nn.Module, meta: dict | None) -> nn.Module:
    """A flexmoe MoE computing what a loaded FlexOlmo / Mixtral model computes."""
    config = hf.config
    num_experts = config.num_experts if config.model_type == "flex_olmo" else config.num_local_experts
    owners = [PUBLIC] + [f"expert_{i}" for i in range(1, num_experts)]
    if meta is not None and len(meta.get("owners", [])) == num_experts:
        owners = list(meta["owners"])  # exported by flexmoe: keep the owners' names
    normalize = bool(config.norm_topk_prob) if config.model_type == "flex_olmo" else True
    top_k = config.num_experts_per_tok
    base_config = dense_config(config)
    hf_state = hf.state_dict()
    model = _empty_model(base_config, hf.dtype)
    with torch.no_grad():
        for name, t in dense_tensors(model, mlp_prefixes(model)):
            t.copy_(hf_state[name])
    del hf_state
    upcycle(model, num_experts - 1, owners=owners[1:], normalize=normalize)
    set_top_k(model, None if top_k >= num_experts else top_k)
    with torch.no_grad():
        for hf_layer, block in zip(decoder_layers(hf), moe_blocks(model)):
            gate_up, down = hf_layer.mlp.experts.gate_up_proj, hf_layer.mlp.experts.down_proj
            inter = gate_up.shape[1] // 2
            for j, expert in enumerate(block.experts):
                expert.gate_proj.weight.copy_(gate_up[j, :inter])  # gate rows come first
                expert.up_proj.weight.copy_(gate_up[j, inter:])
                expert.down_proj.weight.copy_(down[j])
            gate = hf_layer.mlp.gate.weight  # no bias: a plain router with zero biases computes it
            block.router = Router.from_rows(gate, torch.zeros(gate.shape[0]))
    model.generation_config = hf.generation_config
    return model


def load_public_model(public_model: str | Path | nn.Module, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """A local ``transformers`` directory or a hub id (loaded with ``from_pretrained``), or a model object."""
    if isinstance(public_model, nn.Module):
        return public_model

    path = Path(public_model)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(str(public_model), dtype=dtype)


def detect_format(model_dir: str | os.PathLike) -> str:
    """The format a merged model directory is in: ``native``, ``remote``, ``flexolmo`` or ``mixtral``."""
    d = Path(model_dir)
    meta = d / "flexmoe_config.json"  # every flexmoe export writes it, whatever the format
    if meta.is_file():
        fmt = json.loads(meta.read_text()).get("format")
        if fmt in ("native", "remote", "flexolmo", "mixtral"):
            return fmt
    config = d / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{d}: neither flexmoe_config.json nor config.json; expected a merged model directory")
    model_type = json.loads(config.read_text()).get("model_type")
    formats = {"flex_olmo": "flexolmo", "mixtral": "mixtral"}
    if model_type not in formats:
        raise ValueError(
            f"{d}: model_type {model_type!r} is not a mixture of experts flexmoe can open "
            "(expected a flexmoe export, a FlexOlmo or a Mixtral checkpoint)"
        )
    return formats[model_type]
