"""Export a flexmoe MoE as a ``transformers`` checkpoint, or in flexmoe's native format.

Four on-disk formats (docs/design.md, "Export formats"); :mod:`flexmoe.formats.load` reads them back:

``flexolmo``  OLMo-2 based models -> ``FlexOlmoForCausalLM`` (``model_type`` ``flex_olmo``).
    Keys: ``model.layers.L.mlp.gate.weight`` [E, H] and
    ``model.layers.L.mlp.experts.J.{gate,up,down}_proj.weight`` -- what ``save_pretrained``
    itself writes; transformers fuses the experts on load.
``mixtral``   Llama / Mistral based models -> ``MixtralForCausalLM``. Keys:
    ``model.layers.L.block_sparse_moe.gate.weight`` and
    ``model.layers.L.block_sparse_moe.experts.J.w{1,2,3}.weight`` (w1 = gate, w3 = up, w2 = down),
    again what ``save_pretrained`` writes and what every Mixtral checkpoint on the hub uses.
``native``    any supported base: ``base_config.json`` (the dense base model's config),
    ``flexmoe_config.json`` (owners, top-k, normalisation, the router ``kind``) and safetensors
    under flexmoe's own state-dict names (``...mlp.experts.J.*``, and the router's
    :meth:`~flexmoe.core.moe.ExpertRouter.native_state` under ``...mlp.router.*``: ``weight`` and
    the raw ``bias`` for the library's routers). Reopen it with :func:`flexmoe.load`.

    A native directory deliberately has **no** ``config.json``: its tensors are not a dense
    model's, and a ``config.json`` would let ``AutoModelForCausalLM.from_pretrained`` build the
    dense base, miss every MLP weight and initialise them at random with only a warning.
    Without one, ``from_pretrained`` fails loudly ("Unrecognized model ... config.json").
``remote``    the native layout (``base_config.json`` and the same tensors under the same names)
    plus a ``config.json`` of ``model_type`` ``flexmoe`` whose ``auto_map`` names the modeling
    code copied beside it (``configuration_flexmoe.py``, ``modeling_flexmoe.py``, from
    :mod:`flexmoe.modeling`), so ``AutoModelForCausalLM.from_pretrained(dir,
    trust_remote_code=True)`` builds the merged model, any router flexmoe's modeling code knows
    (``posterior``, ``clamped``, ``affine``) included, without flexmoe installed. Its
    ``config.json`` copies every field of the dense base's config (the decoder is the base
    architecture, built by ``AutoModel``) and adds ``base_model_type`` and the ``moe_*`` fields.
    Exact for every base in :data:`REMOTE_BASES`; :func:`flexmoe.load` reopens it as a native export.

The two ``transformers`` formats are exact (``from_pretrained`` reproduces flexmoe's logits)
only when the MoE fits them: their routers have no bias, and Mixtral always renormalises
the top-k weights. Anything else is refused unless ``allow_approximate=True``. Their gate is
the router's :meth:`~flexmoe.core.moe.ExpertRouter.linear_gate`; a router that is not a linear
map of one token raises :class:`~flexmoe.core.moe.RouterFormatError` (native only). Every shared
config field is copied, because the classes' defaults differ (``rms_norm_eps``, RoPE theta,
``sliding_window``); a base field the target cannot express is refused.

Weights are written in shards: one for the dense tensors, all routers and expert 0 (the public
model), then one per owner expert, plus the standard ``model.safetensors.index.json``. The same
writer serves :func:`export` (an MoE in memory) and :func:`flexmoe.assembly.assemble_to_dir` (the
public model plus artifact files, streamed one tensor at a time by
:func:`write_shard_streamed`, so memory grows with neither the number of owners nor their size).
Every export is built in a temporary sibling directory and renamed into place when complete.

Every export, whatever its format, also carries the model's provenance (who contributed each
expert, the artifact hashes, what each owner shared, the routing recipe, the evaluation:
:mod:`flexmoe.core.provenance`) in ``flexmoe_config.json`` and the model card rendered from it,
``README.md`` (:mod:`flexmoe.formats.model_card`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    FlexOlmoConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    PreTrainedConfig,
)

from flexmoe import modeling as remote_code
from flexmoe.core.errors import InputError
from flexmoe.core.io import atomic_dir
from flexmoe.core.moe import ExpertRouter
from flexmoe.core.provenance import Provenance
from flexmoe.core.surgery import decoder_layers, moe_blocks, settings
from flexmoe.formats.model_card import write_model_card
from flexmoe.modeling.configuration_flexmoe import FlexMoEConfig

log = logging.getLogger(__name__)

NATIVE_VERSION = "1"
FLEXMOE_CONFIG = "flexmoe_config.json"
BASE_CONFIG = "base_config.json"
INDEX = "model.safetensors.index.json"
FORMATS = ("flexolmo", "mixtral", "native", "remote")
# Formats that store the tensors under flexmoe's own names (the remote format adds modeling code).
_NATIVE_LAYOUT = ("native", "remote")
# Dense bases whose decoder ``AutoModel`` builds with a gated MLP at ``layers[L].mlp``: what the
# remote format's modeling code rebuilds, and the router kinds it implements.
REMOTE_BASES = ("olmo2", "llama", "mistral", "qwen2", "qwen3")
REMOTE_ROUTERS = ("posterior", "clamped", "affine")
# The export format when none is named, everywhere (export, assemble_to_dir, the assembly
# pipeline, the command line): the base's transformers format when it holds the model exactly, else native.
DEFAULT_FORMAT = "auto"
# Which dense bases each transformers format can hold, and its config class.
_HF = {"flexolmo": (("olmo2",), FlexOlmoConfig), "mixtral": (("llama", "mistral"), MixtralConfig)}
# Mixtral names its expert projections w1 (gate), w3 (up), w2 (down).
_MIXTRAL_EXPERT_NAMES = {
    "gate_proj.weight": "w1.weight",
    "up_proj.weight": "w3.weight",
    "down_proj.weight": "w2.weight",
}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


# -- tensor sources: where the weights come from -------------------------------------------


class _ModelSource:
    """An MoE held in memory (what :func:`export` writes)."""

    def __init__(self, model: nn.Module):
        s = settings(model)
        self.model, self.config = model, model.config
        self.owners, self.top_k, self.normalize = list(s.owners), s.top_k, s.normalize
        self.provenance: Provenance = s.provenance.copy()
        self.blocks = moe_blocks(model)
        self.mlp_prefixes = mlp_prefixes(model)

    def dense_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return dense_tensors(self.model, self.mlp_prefixes)

    def routers(self) -> list[ExpertRouter]:
        return [b.router for b in self.blocks]

    def expert(self, j: int) -> list[dict[str, torch.Tensor]]:
        return [b.experts[j].state_dict() for b in self.blocks]

    def renormalisation_gap(self) -> float | None:
        """Max |logit difference| on a fixed random probe between this model and the same
        model with its top-k weights renormalised (what Mixtral would compute)."""
        model, s = self.model, settings(self.model)
        ids = torch.randint(self.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        was_training, old = model.training, s.normalize
        model.eval()
        try:
            with torch.inference_mode():
                device = next(model.parameters()).device
                plain = model(ids.to(device)).logits.float()
                s.normalize = True
                renormalised = model(ids.to(device)).logits.float()
        finally:
            s.normalize = old
            model.train(was_training)
        return float((plain - renormalised).abs().max())


def mlp_prefixes(model: nn.Module) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer.mlp)] for layer in decoder_layers(model)]


def dense_tensors(model: nn.Module, mlp_prefixes: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Everything outside the MLPs, once per storage (tied ``lm_head`` is left out, as HF does)."""
    skip = tuple(p + "." for p in mlp_prefixes)
    seen = set()
    for name, t in model.state_dict().items():
        if name.startswith(skip):
            continue
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        yield name, t


# -- formats: names and configs --------------------------------------------------------------


def _resolve_format(fmt: str, source, allow_approximate: bool) -> str:
    base = source.config.model_type
    if fmt == "auto":
        for candidate, (bases, _) in _HF.items():
            if base in bases:
                try:
                    _hf_config(source, candidate, torch.float32)  # raises if the base config does not fit
                    problems = _approximations(source, candidate)
                except ValueError as e:
                    problems = [str(e)]
                if not problems:
                    return candidate
                log.info("exporting in the native format: %s would not be exact: %s", candidate, "; ".join(problems))
        return "native"
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)} or 'auto'")
    if fmt == "native":
        return fmt
    if fmt == "remote":
        _check_remote(source)
        return fmt
    bases = _HF[fmt][0]
    if base not in bases:
        fits = [f for f, (b, _) in _HF.items() if base in b] + ["native"]
        raise InputError(
            f"the {fmt} format holds models built on {' or '.join(bases)}, but this one is built on {base!r}; "
            f"formats supported for {base!r}: {', '.join(fits)}"
        )
    problems = _approximations(source, fmt)
    if problems and not allow_approximate:
        raise InputError(
            f"exporting to {fmt} would not reproduce this model: {'; '.join(problems)}. "
            "Pass allow_approximate=True to export anyway, or use format='native', which is exact."
        )
    for p in problems:
        log.warning("approximate %s export: %s", fmt, p)
    return fmt


def target_format(model: nn.Module, fmt: str = DEFAULT_FORMAT) -> str:
    """The format :func:`export` picks for ``fmt`` once the router biases are folded into the
    rows (:func:`flexmoe.routing.fold_router_bias`): the ``transformers`` format of the base when
    it can express the model apart from its biases, else ``native``."""
    if fmt != "auto":
        return fmt
    source = _ModelSource(model)
    for candidate, (bases, _) in _HF.items():
        if source.config.model_type in bases:
            try:
                _hf_config(source, candidate, torch.float32)
                if not _approximations(source, candidate, ignore_bias=True):
                    return candidate
            except ValueError:  # the base config or a router does not fit the format
                continue
    return "native"


def _check_remote(source) -> None:
    """Refuse what the remote format's modeling code cannot rebuild: another base, another router."""
    base = source.config.model_type
    if base not in REMOTE_BASES:
        raise InputError(
            f"the remote format's modeling code rebuilds models built on {', '.join(REMOTE_BASES)}, but this one is "
            f"built on {base!r}; use format='native'"
        )
    kinds = sorted({r.kind for r in source.routers()} - set(REMOTE_ROUTERS))
    if kinds:
        raise InputError(
            f"the remote format's modeling code implements the {', '.join(REMOTE_ROUTERS)} routers, not {kinds}; "
            "use format='native'"
        )


def _remote_config(source, dtype: torch.dtype) -> PreTrainedConfig:
    """``config.json`` of a remote export: the base's fields, the mixture's, and the ``auto_map``."""
    routers = source.routers()
    holders = [L for L, r in enumerate(routers) if getattr(r, "holds_statistics", False)]
    resets = routers[holders[0]].reset_tokens.tolist() if holders else []
    fields = {k: v for k, v in source.config.to_dict().items() if k not in _NOT_COPIED}
    fields["dtype"] = str(dtype).removeprefix("torch.")
    config = FlexMoEConfig(
        **fields,
        base_model_type=source.config.model_type,
        moe_owners=list(source.owners),
        moe_top_k=source.top_k,
        moe_normalize=source.normalize,
        moe_router=_router_kinds(routers),
        moe_reset_tokens=resets,
        moe_statistics_layer=holders[0] if holders else None,
        moe_bigram_buckets=int(routers[holders[0]].bigram.shape[1])
        if holders and routers[holders[0]].holds_bigram
        else 0,
    )
    config.architectures = ["FlexMoEForCausalLM"]
    config.auto_map = {
        "AutoConfig": "configuration_flexmoe.FlexMoEConfig",
        "AutoModelForCausalLM": "modeling_flexmoe.FlexMoEForCausalLM",
    }
    return config


def _approximations(source, fmt: str, *, ignore_bias: bool = False) -> list[str]:
    """What a ``transformers`` format would change about the model (empty: exact). Raises
    :class:`~flexmoe.core.moe.RouterFormatError` when a router is no linear gate at all."""
    problems = []
    biases = [router.linear_gate()[1] for router in source.routers()]
    # Softmax ignores a shift common to all experts: only biases relative to the public one matter.
    worst = 0.0 if ignore_bias else max(float((b - b[0]).abs().max()) for b in biases)
    if worst > 0:
        problems.append(
            f"{fmt} routers have no bias, so the non-zero router biases would be dropped "
            f"(max |b_j - b_0| = {worst:.4g}; flexmoe.routing.fold_router_bias moves them into the rows)"
        )
    num_experts = len(source.owners)
    k = num_experts if source.top_k is None else source.top_k
    if fmt == "mixtral" and not source.normalize and k < num_experts:
        gap = source.renormalisation_gap()
        measured = f"; max abs logit difference on a random probe: {gap:.4g}" if gap is not None else ""
        problems.append(
            f"Mixtral renormalises the top-{k} router weights to sum to 1 but this model does not "
            f"(normalize=False, top_k={k} of {num_experts} experts){measured}"
        )
    return problems


def _layout(fmt: str, prefix: str, j: int, name: str) -> str:
    """On-disk name of expert ``j``'s tensor ``name`` in the MLP at ``prefix``."""
    if fmt not in _NATIVE_LAYOUT and name not in _MIXTRAL_EXPERT_NAMES:
        raise ValueError(f"{fmt} experts are gate/up/down projections without bias; cannot store {name!r}")
    if fmt == "mixtral":
        return f"{_mixtral_prefix(prefix)}.experts.{j}.{_MIXTRAL_EXPERT_NAMES[name]}"
    return f"{prefix}.experts.{j}.{name}"


def _router_tensors(fmt: str, prefix: str, router: ExpertRouter) -> dict[str, torch.Tensor]:
    if fmt in _NATIVE_LAYOUT:
        return {f"{prefix}.router.{name}": t for name, t in router.native_state().items()}
    weight = router.linear_gate()[0]  # the biases were checked (or allowed to drop) by _approximations
    if fmt == "mixtral":
        return {f"{_mixtral_prefix(prefix)}.gate.weight": weight}
    return {f"{prefix}.gate.weight": weight}


def _router_kinds(routers: Sequence[ExpertRouter]) -> str | list[str]:
    """The ``router`` entry of ``flexmoe_config.json``: one kind, or one per layer when they differ."""
    kinds = [r.kind for r in routers]
    return kinds[0] if len(set(kinds)) == 1 else kinds


def _mixtral_prefix(prefix: str) -> str:
    head, _, last = prefix.rpartition(".")
    if last != "mlp":
        raise ValueError(f"expected the MLP at '<layer>.mlp', found {prefix!r}")
    return f"{head}.block_sparse_moe"


_NOT_COPIED = {"model_type", "architectures", "transformers_version", "_name_or_path"}
# MoE-only fields: set from the flexmoe settings on export, read back into them on import.
_MOE_FIELDS = {
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_jitter_noise",
}


def _translate_config(src: PreTrainedConfig, target_cls, *, drop=(), require=None, **fixed) -> PreTrainedConfig:
    """Build a ``target_cls`` config that copies every field it shares with ``src``.

    ``fixed`` sets fields explicitly; ``drop`` names ``src``-only fields that can be left
    behind; ``require`` maps ``src``-only fields to the only value the target can express.
    Any other ``src``-only field is refused, and so is a copied field the target changes.
    """
    require = require or {}
    fields = {f.name for f in dataclasses.fields(target_cls)} | set(PreTrainedConfig().to_dict())
    kwargs, unknown = {}, {}
    for key, value in src.to_dict().items():
        if key in _NOT_COPIED or key in fixed or key in drop:
            continue
        if key in fields:
            kwargs[key] = value
        elif key in require:
            if value != require[key]:
                raise ValueError(
                    f"{src.model_type} config has {key}={value!r}, which {target_cls.__name__} cannot express "
                    f"(only {require[key]!r}); use format='native'"
                )
        else:
            unknown[key] = value
    if unknown:
        raise ValueError(
            f"{target_cls.__name__} has no field for these {src.model_type} config values: {unknown}; "
            "use format='native'"
        )
    config = target_cls(**kwargs, **fixed)
    got = config.to_dict()
    changed = {k: (v, got.get(k)) for k, v in kwargs.items() if v is not None and got.get(k) != v}
    if changed:
        raise ValueError(f"{target_cls.__name__} did not keep these config fields (wanted, got): {changed}")
    return config


def _hf_config(source, fmt: str, dtype: torch.dtype) -> PreTrainedConfig:
    num_experts = len(source.owners)
    k = num_experts if source.top_k is None else source.top_k
    target_cls = _HF[fmt][1]
    moe = dict(num_experts_per_tok=k, num_experts=num_experts, norm_topk_prob=source.normalize)
    if fmt == "mixtral":
        # Llama attention has no sliding window; Mixtral's default could be anything.
        moe = dict(
            num_experts_per_tok=k,
            num_local_experts=num_experts,
            router_jitter_noise=0.0,
            sliding_window=getattr(source.config, "sliding_window", None),
        )
    require = {"attention_bias": False, "mlp_bias": False} if fmt == "mixtral" else {}
    config = _translate_config(
        source.config,
        target_cls,
        drop={"pretraining_tp", "dtype"},
        require=require,
        dtype=str(dtype).removeprefix("torch."),
        **moe,
    )
    config.architectures = ["FlexOlmoForCausalLM" if fmt == "flexolmo" else "MixtralForCausalLM"]
    return config


def dense_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The dense base config of a FlexOlmo (-> OLMo-2) or Mixtral (-> Llama, or Mistral when it
    uses a sliding window) config."""
    if config.model_type == "flex_olmo":
        return _translate_config(config, Olmo2Config, drop=_MOE_FIELDS)
    if getattr(config, "sliding_window", None) is None:
        return _translate_config(config, LlamaConfig, drop=_MOE_FIELDS | {"sliding_window"})
    return _translate_config(config, MistralConfig, drop=_MOE_FIELDS)


# -- writing ---------------------------------------------------------------------------------


def write_checkpoint(source, out_dir, fmt: str, *, allow_approximate: bool, files=(), tokenizer=None) -> Path:
    """Write ``source`` in format ``fmt`` (or ``"auto"``) into ``out_dir``, atomically, with its
    provenance and model card. ``source.provenance`` is read after the shards are written (a
    streamed source records each expert as it loads it)."""
    fmt = _resolve_format(fmt, source, allow_approximate)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; choose a new path or remove it")
    dtype = next(t for _, t in source.dense_tensors() if t.is_floating_point()).dtype
    # Build the config first: it refuses what the format cannot express before any weight is written.
    if fmt in _NATIVE_LAYOUT:
        config = copy.deepcopy(source.config)
        config.dtype = dtype
    else:
        config = _hf_config(source, fmt, dtype)
    remote = _remote_config(source, dtype) if fmt == "remote" else None
    with atomic_dir(out_dir) as tmp:
        # The whole config, not the diff to today's defaults: those differ between versions.
        config.to_json_file(tmp / (BASE_CONFIG if fmt in _NATIVE_LAYOUT else "config.json"), use_diff=False)
        if remote is not None:
            remote.to_json_file(tmp / "config.json", use_diff=False)
            for name in remote_code.FILES:
                shutil.copyfile(Path(remote_code.__file__).parent / name, tmp / name)
        _write_shards(source, tmp, fmt)
        meta = {
            "format": fmt,
            "format_version": NATIVE_VERSION,
            "base_model_type": source.config.model_type,
            "num_layers": len(source.mlp_prefixes),
            "owners": source.owners,
            "top_k": source.top_k,
            "normalize": source.normalize,
            "router": _router_kinds(source.routers()),
            "provenance": source.provenance.to_json(),
        }
        (tmp / FLEXMOE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        write_model_card(tmp, source.provenance, meta, out_dir.name)
        generation = getattr(source.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        for f in files:
            shutil.copy2(f, tmp / Path(f).name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def _write_shards(source, directory: Path, fmt: str) -> None:
    """Shard 1: dense tensors, every router, expert 0. Shard j+1: expert j of every layer."""
    num_experts = len(source.owners)
    names = [f"model-{i:05d}-of-{num_experts:05d}.safetensors" for i in range(1, num_experts + 1)]
    weight_map, total = {}, 0

    def write(tensors: dict[str, torch.Tensor], name: str) -> None:
        nonlocal total
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()

    stream = getattr(source, "expert_stream", None)  # a source that reads each expert one tensor at a time
    for j in range(num_experts):
        if j and stream is not None:
            declared, tensors = stream(j)
            layout = {}
            for prefix, state in zip(source.mlp_prefixes, declared):
                layout.update({_layout(fmt, prefix, j, name): t for name, t in state.items()})
            total += write_shard_streamed(directory / names[j], layout, _renamed(tensors, source.mlp_prefixes, fmt, j))
            weight_map.update(dict.fromkeys(layout, names[j]))
            continue
        shard = dict(source.dense_tensors()) if j == 0 else {}
        if j == 0:
            for prefix, router in zip(source.mlp_prefixes, source.routers()):
                shard.update(_router_tensors(fmt, prefix, router))
        for prefix, state in zip(source.mlp_prefixes, source.expert(j)):
            shard.update({_layout(fmt, prefix, j, name): t for name, t in state.items()})
        write(shard, names[j])
        del shard  # the artifact this shard came from goes with it
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


# safetensors lays a file's tensors out by dtype, the widest first, then by name: the order
# save_file writes, for the float dtypes an expert may hold.
_SAFETENSORS_DTYPES = {torch.float32: (0, "F32"), torch.bfloat16: (1, "BF16"), torch.float16: (2, "F16")}


def write_shard_streamed(
    path: Path, declared: dict[str, torch.Tensor], tensors: Iterable[tuple[str, torch.Tensor]]
) -> int:
    """Write a safetensors shard whose tensors arrive one at a time, in any order, and return its
    data size in bytes: the header from ``declared`` (name -> a tensor of the right shape and
    dtype; a ``meta`` tensor will do), then each tensor of ``tensors`` at its offset as it comes.

    The file is byte for byte what ``save_file(..., metadata={"format": "pt"})`` writes for the
    same tensors (its order, header and padding; tests/test_assembly_streaming.py), so a streamed
    export and an in-memory one are the same files. ``tensors`` must give every declared tensor
    exactly once, with its declared shape and dtype."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets, at = {}, 0
    for name in sorted(declared, key=lambda k: (_safetensors_dtype(declared[k])[0], k)):
        t = declared[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _safetensors_dtype(t)[1], "shape": list(t.shape), "data_offsets": [at, at + size]}
        offsets[name], at = at, at + size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    start = 8 + len(raw)
    written = set()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, t in tensors:
            want = declared.get(name)
            if want is None or name in written or t.dtype != want.dtype or t.shape != want.shape:
                raise ValueError(f"{path.name}: {name!r} {t.dtype} {list(t.shape)} was not declared, or came twice")
            f.seek(start + offsets[name])
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            written.add(name)
            del t  # before the next one is read
    if len(written) != len(declared):
        raise ValueError(f"{path.name}: never given {sorted(set(declared) - written)[:4]}")
    return at


def _renamed(tensors, prefixes: Sequence[str], fmt: str, j: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Expert ``j``'s ``(layer, name, tensor)`` under their on-disk names, holding none of them."""
    for L, name, t in tensors:
        yield _layout(fmt, prefixes[L], j, name), t
        del t


def _safetensors_dtype(t: torch.Tensor) -> tuple[int, str]:
    if t.dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"a streamed shard holds float32, bfloat16 or float16 tensors, not {t.dtype}")
    return _SAFETENSORS_DTYPES[t.dtype]


# -- public API ------------------------------------------------------------------------------


def export(
    model: nn.Module, out_dir, format: str = DEFAULT_FORMAT, *, allow_approximate: bool = False, tokenizer=None
) -> Path:
    """Write a flexmoe MoE as a ``transformers`` FlexOlmo or Mixtral checkpoint, natively, or with
    its own modeling code.

    ``format``: ``"flexolmo"`` (OLMo-2 bases), ``"mixtral"`` (Llama, Mistral), ``"native"``
    (any base; reopen with :func:`flexmoe.load`), ``"remote"`` (the native layout plus
    ``config.json`` and modeling code: ``AutoModelForCausalLM.from_pretrained(out_dir,
    trust_remote_code=True)`` opens it, posterior routers included) or ``"auto"`` (the exact ``transformers`` format if
    there is one, else native). An export that would change the model's outputs (router
    biases, Mixtral's renormalisation) raises ``ValueError`` unless ``allow_approximate``.
    Returns ``out_dir``, which must not exist yet (or be empty). ``tokenizer``: a tokenizer to
    save alongside, or a model directory whose tokenizer files are copied.
    """
    files = ()
    if isinstance(tokenizer, (str, os.PathLike)):
        files, tokenizer = tokenizer_files(tokenizer), None
    return write_checkpoint(
        _ModelSource(model), out_dir, format, allow_approximate=allow_approximate, files=files, tokenizer=tokenizer
    )


def tokenizer_files(model_dir) -> list[Path]:
    """The tokenizer files a model directory holds (copied along with every export)."""
    return [Path(model_dir) / f for f in _TOKENIZER_FILES if (Path(model_dir) / f).is_file()]
