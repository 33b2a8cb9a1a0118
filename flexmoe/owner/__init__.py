"""The owner side: what a data owner computes from its own documents besides training.

``embed`` initialises the owner's router row from its documents (a sentence embedder, or the
public model's own hidden states); ``proxy`` picks the public documents that look like the
owner's, the only trace of its data it may share. Both run on the owner's machine and send
nothing themselves. This floor sits above ``assembly`` and below the callbacks, which call it
during an owner's training run.
"""
