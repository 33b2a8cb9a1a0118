"""The modeling code a ``remote`` export ships beside its weights (:mod:`flexmoe.formats.export`).

``configuration_flexmoe.py`` and ``modeling_flexmoe.py`` are copied, as they are, into every
``remote`` export, whose ``config.json`` names them in ``auto_map``, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` builds the merged model
without flexmoe installed. They import only ``torch`` and ``transformers`` (relative imports
between the two are the only others ``transformers`` copies along), and flexmoe itself reads a
``remote`` export through its native loader, never through them.
"""

FILES = ("configuration_flexmoe.py", "modeling_flexmoe.py")
