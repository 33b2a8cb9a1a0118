"""The artifacts floor: the files an owner sends the coordinator, and their validation.

An expert file comes from another party, so everything that reads one lives here: the header
guard that checks the raw bytes before safetensors sees them (``guard``), the full expert
(``expert``), the LoRA-sized expert (``lora``, ``peft_adapters``) and the loader that takes either
(``load``). It sits just above ``core`` and ``spec``: it needs the MoE model to extract and
validate an expert, and nothing that trains, routes or exports. docs/design.md lists the tensor
names and metadata.
"""
