"""``flexmoe plan``: will an owner's training run fit, and how should it run? (flexmoe/plan.py)"""

from __future__ import annotations

import json as jsonlib

from flexmoe.plan import Device, GiB, MemoryEstimate, Precision, model_shape, parse_memory
from flexmoe.plan import plan as make_plan
from flexmoe.spec import ExpertRecipe, FederationSpec


def plan(
    model: str | None = None,
    spec: str | None = None,
    memory: str | None = None,
    devices: int = 1,
    precision: Precision | None = None,
    device: Device = "cuda",
    batch_size: int | None = None,
    seq_len: int | None = None,
    layers: int | None = None,
    json: bool = False,
) -> None:
    """Print the expected peak memory per device of an owner's `flexmoe train-expert` run.

    ::

        flexmoe plan --model olmo2-7b --memory 80GB --devices 8
        flexmoe plan --spec spec.json --memory 24GB --json

    Args:
        model: the public model: a transformers directory, a config.json, or a known shape
            (olmo2-150m, olmo2-1b, olmo2-7b, olmo2-13b). Default: the spec's public model.
        spec: the FederationSpec whose expert recipe (batch size, sequence length) is planned;
            without one, the default recipe.
        memory: memory per device (80GB, 80GiB, 24000MB); with it, the settings that fit.
        devices: devices the owner trains on (data parallel, or FSDP sharding).
        precision: 32-true (float32 throughout) or bf16-mixed (public weights in bfloat16, the
            expert in float32 under autocast). Default: the spec's recipe's, or bf16-mixed
            without a spec (what an owner at 1B-7B runs).
        device: cuda (adds AdamW's foreach workspace and 1 GiB for the CUDA runtime) or cpu.
        batch_size: override the recipe's batch size (rows per optimizer step, all devices).
        seq_len: override the recipe's sequence length.
        layers: plan the model with this many decoder layers instead.
        json: print the plan as JSON instead of a table.
    """
    loaded = FederationSpec.load(spec) if spec else None
    name = model or (loaded.public_model if loaded else None)
    if name is None:
        raise ValueError("give --model (a model directory, config.json or known shape) or --spec")
    shape = model_shape(name)
    if layers is not None:
        shape = shape.with_layers(layers)
    recipe = loaded.expert if loaded else ExpertRecipe()
    recipe = ExpertRecipe(
        **{**vars(recipe), "batch_size": batch_size or recipe.batch_size, "seq_len": seq_len or recipe.seq_len}
    )
    precision = precision or (recipe.precision if loaded else "bf16-mixed")
    budget = parse_memory(memory) if memory else None
    result = make_plan(shape, recipe, memory=budget, devices=devices, precision=precision, device=device, model=name)
    if json:
        print(jsonlib.dumps(result.to_dict(), indent=2))
        return
    s = shape
    print(
        f"{name}: {s.dense_params / 1e9:.2f}B public parameters ({s.num_layers} layers, hidden {s.hidden_size}, "
        f"MLP {s.intermediate_size}, vocabulary {s.vocab_size}); the owner trains {s.trainable_params / 1e9:.2f}B "
        f"(expert 1 and the routers)"
    )
    print(
        f"batch {recipe.batch_size} x {recipe.seq_len} tokens over {devices} {device} device(s), {precision}; "
        f"GiB per device"
    )
    _table(result.estimates)
    if budget is not None:
        print(f"\nfits {memory} per device (largest micro-batch; accumulate gradients for the rest):")
        if result.fits:
            _table(result.fits)
        else:
            print("  nothing fits: more devices with FSDP, or a smaller model")


def _table(rows: list[MemoryEstimate]) -> None:
    head = ["micro-batch", "seq", "ckpt", "fsdp", "frozen", "train", "grads", "adamw", "activ", "step", "peak"]
    print("  " + " ".join(f"{h:>11}" if i == 0 else f"{h:>6}" for i, h in enumerate(head)))
    for e in rows:
        s = e.setting
        cells = [s.micro_batch, s.seq_len, "yes" if s.checkpointing else "no", "yes" if s.fsdp else "no"]
        parts = [e.frozen_weights, e.trainable_weights, e.gradients, e.optimizer_state, e.activations]
        cells += [f"{x / GiB:.1f}" for x in (*parts, e.step_workspace, e.peak)]
        print("  " + " ".join(f"{c:>11}" if i == 0 else f"{c:>6}" for i, c in enumerate(cells)))
    e = rows[0]
    print(
        f"  activations per token: {e.activations_per_token / 2**20:.2f} MiB, "
        f"{e.activations_per_token_checkpointed / 2**20:.3f} MiB checkpointed"
    )
