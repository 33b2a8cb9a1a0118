"""Configuration of a flexmoe merged model exported with its modeling code (``model_type`` ``flexmoe``).

Shipped inside every ``remote`` export of flexmoe and loaded by ``transformers`` with
``trust_remote_code=True``; it imports only ``transformers``. The config holds every field of the
dense base model's config (``base_model_type`` names its class: ``olmo2``, ``llama``, ...), so
that the decoder is the base architecture and ``generate`` sizes its caches from the usual
fields, plus the mixture's own ``moe_*`` fields.
"""

from transformers import AutoConfig, PreTrainedConfig

# Fields that belong to this wrapper, not to the dense base model.
MOE_FIELDS = (
    "base_model_type",
    "moe_owners",
    "moe_top_k",
    "moe_normalize",
    "moe_router",
    "moe_reset_tokens",
    "moe_statistics_layer",
    "moe_bigram_buckets",
)
_NOT_BASE = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", *MOE_FIELDS}


class FlexMoEConfig(PreTrainedConfig):
    """The dense base's fields (as extra attributes) and the mixture's.

    ``moe_owners``: the experts' owners, the public model first. ``moe_top_k``: experts run per
    token (``None``: all). ``moe_normalize``: renormalise the top-k weights. ``moe_router``: the
    router kind of every layer (``posterior``, ``clamped`` or ``affine``), or one per layer.
    ``moe_reset_tokens``: the token ids after which the posterior restarts (sizes that buffer).
    ``moe_statistics_layer``: the layer whose router holds the domain statistics (``None``: no
    posterior router). ``moe_bigram_buckets``: the hashed bigram counts' bucket count (sizes that
    buffer; ``0``: the posterior reads unigrams alone).
    """

    model_type = "flexmoe"

    base_model_type: str = "olmo2"
    moe_owners: list[str] | None = None
    moe_top_k: int | None = None
    moe_normalize: bool = False
    moe_router: str | list[str] = "posterior"
    moe_reset_tokens: list[int] | None = None
    moe_statistics_layer: int | None = None
    moe_bigram_buckets: int = 0

    def base_config(self) -> PreTrainedConfig:
        """The dense base model's config, rebuilt from the fields this config copied."""
        fields = {k: v for k, v in self.to_dict().items() if k not in _NOT_BASE}
        return AutoConfig.for_model(self.base_model_type, **fields)


__all__ = ["FlexMoEConfig"]
