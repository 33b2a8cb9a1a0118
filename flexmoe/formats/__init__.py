"""The formats floor: a flexmoe MoE on disk, as a native, remote-code, FlexOlmo or Mixtral checkpoint.

``export`` writes a model in memory (or, for :mod:`flexmoe.assembly`, the public model plus
expert files streamed one at a time), exactly or not at all; ``load`` reopens any of the four,
and official FlexOlmo or Mixtral checkpoints, as a flexmoe MoE that takes opt-outs and new
experts. It needs only ``core``; it sits below ``assembly``, which writes through it.
docs/design.md lists the formats' tensor names.
"""
