"""The self-contained modeling code of a flexmoe merged model: the lowest floor of the package.

A ``remote`` export (:mod:`flexmoe.formats.export`) copies :data:`FILES`, as they are, beside its
weights, and its ``config.json`` names them in ``auto_map``, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` builds the merged model
without flexmoe installed. They import only ``torch`` and ``transformers`` (relative imports
between them are the only others ``transformers`` copies along). ``domain_posterior.py`` is also
the posterior router's arithmetic inside flexmoe (:mod:`flexmoe.core.posterior` imports it), so
the library and its exports compute the posterior with one copy of the code. flexmoe itself reads
a ``remote`` export through its native loader, never through these classes.
"""

FILES = ("configuration_flexmoe.py", "modeling_flexmoe.py", "domain_posterior.py")
