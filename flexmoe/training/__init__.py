"""The training floor: every ``LightningModule`` flexmoe ships, and the optimiser they share.

``expert`` and ``lora_expert`` train an owner's expert against the frozen public model
(FlexOlmo section 3.2); ``router_tuning`` tunes only the merged model's routers, at the
coordinator or in federated rounds (section 3.4); ``pretrain`` makes a small public model from
scratch; ``optim`` is the AdamW with warmup and cosine decay they all use. It sits above the
callbacks (an owner's run always attaches them) and below the baselines, the federation and the
CLI, which drive it.
"""
