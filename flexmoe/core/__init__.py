"""The lowest floor: the MoE block and its routers, model surgery, hashing and atomic writes.

Everything else builds on these and they import nothing of flexmoe's above them: no file format,
no training, no Flower. ``moe`` knows nothing of Hugging Face; ``surgery`` turns a
``transformers`` decoder into a FlexOlmo MoE and back; ``hashing`` names a public model and an
expert by content; ``io`` makes every file and directory appear whole or not at all. See
docs/design.md for the floors.
"""
