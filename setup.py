"""Package discovery that pyproject.toml cannot express on its own.

Everything else lives in pyproject.toml. The top-level ``callbacks/`` folder (and any
subpackage added to it later) ships as ``flexmoe.callbacks``; every subpackage of
``flexmoe/`` (``flexmoe.merge``, ``flexmoe.lora``, ``flexmoe.federation``, ...) is found
without editing this file. ``tests/test_packaging.py`` checks the wheel and the editable
install agree.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["flexmoe", "flexmoe.*"])
    + ["flexmoe." + name for name in find_packages(include=["callbacks", "callbacks.*"])],
    package_dir={"flexmoe.callbacks": "callbacks"},
)
