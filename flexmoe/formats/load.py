"""Open a merged model from disk as a flexmoe MoE: native and remote exports, FlexOlmo and Mixtral checkpoints.

A FlexOlmo or Mixtral checkpoint (flexmoe's own export or an official one) is rebuilt as the
flexmoe MoE that computes the same logits, so an official FlexOlmo model can take ``opt_out``
and ``add_expert`` like any merged model; a dense model is returned as it is. It reads the names
and configs :mod:`flexmoe.formats.export` writes, and so sits on the same floor, above it.

A model directory may come from another party, so nothing in it is trusted before it is checked:
the JSON files are read with bounded size and depth (:mod:`flexmoe.core.parsing`); every file the
index names must be a regular file inside the directory (an absolute path, ``..``, a link out, a
FIFO or a device is refused before anything opens it); and for a native export every tensor the
index lists is matched against the shards' headers and against the shapes the base config implies
(built on the meta device, so no memory) before the model is built. The number of experts is the
one the tensors on disk hold, so a ``flexmoe_config.json`` naming 20,000 owners is refused before
one expert is copied. Every refusal is an :class:`~flexmoe.core.errors.InputError`.

The provenance an export recorded in ``flexmoe_config.json`` (:mod:`flexmoe.core.provenance`) is
checked field by field the same way and comes back in the model's settings, so an opt-out or a
new expert re-exports a model card that describes the new model.
"""

from __future__ import annotations

import math
import os
import re
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

from flexmoe.artifacts.guard import ArtifactError, check_owner_name, read_safetensors_header
from flexmoe.core import posterior  # also registers the library's "posterior" router kind
from flexmoe.core.errors import InputError
from flexmoe.core.moe import Router, router_class
from flexmoe.core.parsing import read_json, regular_file, shorten
from flexmoe.core.provenance import Provenance
from flexmoe.core.surgery import PUBLIC, decoder_layers, moe_blocks, set_top_k, settings, upcycle
from flexmoe.formats.export import (
    BASE_CONFIG,
    FLEXMOE_CONFIG,
    INDEX,
    NATIVE_VERSION,
    dense_config,
    dense_tensors,
    mlp_prefixes,
)

# The JSON files of a model directory: a config is a few KB, an index lists every tensor name.
_MAX_CONFIG_BYTES = 4 * 2**20
_MAX_INDEX_BYTES = 64 * 2**20
_EXPERT_KEY = re.compile(r"(.+)\.experts\.([0-9]{1,9})\.(.+)")
_ROUTER_KEY = re.compile(r"(.+)\.router\.(.+)")


def load(path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Open a native or remote flexmoe export, a FlexOlmo or Mixtral checkpoint (as a flexmoe MoE that
    supports ``opt_out``/``add_expert``), or a dense ``transformers`` model (returned as is)."""
    path = Path(path)
    meta = _read_config(path, FLEXMOE_CONFIG) if os.path.lexists(path / FLEXMOE_CONFIG) else None
    if meta is not None and meta.get("format") in ("native", "remote"):
        # A remote export is the native layout plus config.json and modeling code; flexmoe reads the layout.
        return _load_native(path, meta, dtype)
    if not os.path.lexists(path / "config.json"):
        raise FileNotFoundError(f"{path} holds neither a flexmoe export ({FLEXMOE_CONFIG}) nor a config.json")
    _read_config(path, "config.json")
    _check_hf_files(path)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    if model.config.model_type not in ("flex_olmo", "mixtral"):
        return model
    return _from_hf_moe(model, meta, path)


def _read_config(path: Path, name: str) -> dict:
    """A JSON object from file ``name`` of model directory ``path``, bounded (module docstring)."""
    data = read_json(path, name, max_bytes=_MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise InputError(f"{path / name}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_index(path: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> shard file), every shard a regular file inside ``path``."""
    index = read_json(path, INDEX, max_bytes=_MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{path / INDEX}: expected {{'weight_map': {{tensor name: shard file}}}}")
    for shard in set(weight_map.values()):
        regular_file(path, shard, what=f"{path / INDEX}: shard")
    return weight_map


def _check_hf_files(path: Path) -> None:
    """The files ``from_pretrained`` will read are regular files inside ``path`` with sound headers."""
    if os.path.lexists(path / INDEX):
        shards = set(_read_index(path).values())
    else:
        shards = {p.name for p in path.glob("*.safetensors")}
    for shard in sorted(shards):
        _shard_header(path, shard)


def _shard_header(path: Path, shard: str) -> dict:
    """Shard ``shard``'s checked header (:func:`~flexmoe.artifacts.guard.read_safetensors_header`),
    its problems said as a model directory's, not an owner's."""
    try:
        return read_safetensors_header(regular_file(path, shard, what=f"{path}: shard"))
    except ArtifactError as e:
        raise InputError(f"{path / shard}: {e.field}: expected {shorten(e.expected)}, got {shorten(e.got)}") from None


def _check_native_meta(path: Path, meta: dict) -> None:
    """``flexmoe_config.json`` of a native export: every field of the type the loader uses."""
    where = path / FLEXMOE_CONFIG
    if meta.get("format_version") != NATIVE_VERSION:
        raise InputError(
            f"{path}: {meta['format']} format version {shorten(meta.get('format_version'), 40)}, "
            f"this flexmoe reads version {NATIVE_VERSION}"
        )
    owners = meta.get("owners")
    if not (isinstance(owners, list) and owners and all(check_owner_name(o) for o in owners)):
        raise InputError(f"{where}: owners: expected a non-empty list of owner names, got {shorten(owners)}")
    if len(set(owners)) != len(owners):
        raise InputError(f"{where}: owners: the names must be distinct, got {shorten(owners)}")
    top_k = meta.get("top_k")
    if top_k is not None and not (type(top_k) is int and 1 <= top_k <= len(owners)):
        raise InputError(f"{where}: top_k: expected null or an integer in [1, {len(owners)}], got {shorten(top_k)}")
    if type(meta.get("normalize")) is not bool:
        raise InputError(f"{where}: normalize: expected true or false, got {shorten(meta.get('normalize'))}")
    kinds = meta.get("router", Router.kind)
    if not (isinstance(kinds, str) or (isinstance(kinds, list) and all(isinstance(k, str) for k in kinds))):
        raise InputError(f"{where}: router: expected a router kind or a list of them, got {shorten(kinds)}")


def _provenance(path: Path, meta: dict | None, owners: list[str]) -> Provenance:
    """The provenance ``flexmoe_config.json`` records for a model whose experts are ``owners``
    (empty when it records none), checked (:meth:`~flexmoe.core.provenance.Provenance.from_json`)."""
    if meta is None:
        return Provenance()
    try:
        return Provenance.from_json(meta.get("provenance"), owners[1:])
    except InputError as e:
        raise InputError(f"{path / FLEXMOE_CONFIG}: {e}") from None


def _base_config(path: Path) -> PreTrainedConfig:
    _read_config(path, BASE_CONFIG)  # bounded before transformers parses it
    try:
        return AutoConfig.from_pretrained(path / BASE_CONFIG)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise InputError(f"{path / BASE_CONFIG}: not a transformers config: {shorten(str(e))}") from None


def _check_native_tensors(path: Path, config: PreTrainedConfig, owners: int, index: dict[str, str]) -> None:
    """Every tensor the index lists is in the shard it names (and each shard holds only those),
    and has the shape the base config implies: dense tensors as in the base model, expert ``j``'s
    as the base MLP's, for exactly ``owners`` experts; router tensors at most a few rows per
    expert. Checked on headers and a meta-device model, so a directory that declares more than
    the config implies is refused before any memory is spent on it."""
    with torch.device("meta"):
        dense = _empty_model(config, torch.float32)
    shapes = {k: tuple(t.shape) for k, t in dense.state_dict().items()}
    prefixes = set(mlp_prefixes(dense))
    width = max(config.hidden_size, getattr(config, "vocab_size", 0), 2**posterior.MAX_BIGRAM_BITS)
    experts: set[int] = set()
    by_shard: dict[str, set[str]] = {}
    for key, shard in index.items():
        by_shard.setdefault(shard, set()).add(key)
    for shard, keys in sorted(by_shard.items()):
        header = _shard_header(path, shard)
        held = set(header) - {"__metadata__"}
        if held != keys:
            raise InputError(
                f"{path / shard}: holds {shorten(sorted(held - keys)[:5])} not in {INDEX}, "
                f"lacks {shorten(sorted(keys - held)[:5])} that it lists"
            )
        for key in sorted(keys):
            shape = tuple(header[key]["shape"])
            expert, router = _EXPERT_KEY.fullmatch(key), _ROUTER_KEY.fullmatch(key)
            if expert is not None and expert[1] in prefixes:
                experts.add(int(expert[2]))
                want = shapes.get(f"{expert[1]}.{expert[3]}")
            elif router is not None and router[1] in prefixes:
                # Rows, biases and (posterior) counts: a few vectors per expert, checked by the router.
                if len(shape) > 3 or math.prod(shape) > 4 * owners * width:
                    raise InputError(
                        f"{path / shard}: router tensor {shorten(key, 120)} has shape {list(shape)}, "
                        f"more than a few rows of {width} per expert"
                    )
                continue
            else:
                want = shapes.get(key)
            if want is None:
                raise InputError(f"{path / shard}: {shorten(key, 120)} is not a tensor of a {config.model_type} MoE")
            if shape != want:
                raise InputError(
                    f"{path / shard}: {shorten(key, 120)} has shape {list(shape)}, the model expects {list(want)}"
                )
    if experts != set(range(owners)):
        raise InputError(
            f"{path}: {FLEXMOE_CONFIG} names {owners} owners (experts), the tensors hold experts "
            f"{shorten(sorted(experts)[:10])}{' ...' if len(experts) > 10 else ''}"
        )


def _load_native(path: Path, meta: dict, dtype) -> nn.Module:
    _check_native_meta(path, meta)
    owners = meta["owners"]
    provenance = _provenance(path, meta, owners)
    config = _base_config(path)
    dtype = dtype or getattr(torch, str(config.dtype or "float32").removeprefix("torch."))
    index = _read_index(path)
    _check_native_tensors(path, config, len(owners), index)
    model = _empty_model(config, dtype)
    upcycle(model, len(owners) - 1, owners=owners[1:], normalize=meta["normalize"])
    set_top_k(model, meta["top_k"])
    settings(model).provenance = provenance
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


def _from_hf_moe(hf: nn.Module, meta: dict | None, path: Path) -> nn.Module:
    """A flexmoe MoE computing what a loaded FlexOlmo / Mixtral model computes."""
    config = hf.config
    num_experts = config.num_experts if config.model_type == "flex_olmo" else config.num_local_experts
    owners = [PUBLIC] + [f"expert_{i}" for i in range(1, num_experts)]
    provenance = Provenance()
    if meta is not None and len(meta.get("owners", [])) == num_experts:
        owners = list(meta["owners"])  # exported by flexmoe: keep the owners' names and their records
        provenance = _provenance(path, meta, owners)
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
    settings(model).provenance = provenance
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
    if os.path.lexists(d / FLEXMOE_CONFIG):  # every flexmoe export writes it, whatever the format
        fmt = _read_config(d, FLEXMOE_CONFIG).get("format")
        if fmt in ("native", "remote", "flexolmo", "mixtral"):
            return fmt
    if not os.path.lexists(d / "config.json"):
        raise FileNotFoundError(f"{d}: neither flexmoe_config.json nor config.json; expected a merged model directory")
    model_type = _read_config(d, "config.json").get("model_type")
    formats = {"flex_olmo": "flexolmo", "mixtral": "mixtral"}
    if model_type not in formats:
        raise InputError(
            f"{d}: model_type {shorten(model_type, 80)} is not a mixture of experts flexmoe can open "
            "(expected a flexmoe export, a FlexOlmo or a Mixtral checkpoint)"
        )
    return formats[model_type]
