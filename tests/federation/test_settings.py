"""Flower configs -> settings: one conversion point for each config convention."""

from __future__ import annotations

import pytest

from flexmoe.federation.fedavg import FedAvgSettings
from flexmoe.federation.settings import CoordinatorSettings, OwnerSettings, as_bool

MINIMAL = {"spec": "spec.json", "expected-owners": "a,b"}


def test_keys_left_out_keep_the_dataclass_defaults():
    parsed = CoordinatorSettings.from_run_config(MINIMAL)
    assert parsed == CoordinatorSettings(spec="spec.json", expected_owners=["a", "b"])


def test_top_k_0_in_the_run_config_is_all_experts():
    assert CoordinatorSettings.from_run_config({**MINIMAL, "top-k": 0}).top_k is None
    assert CoordinatorSettings.from_run_config({**MINIMAL, "top-k": 2}).top_k == 2
    with pytest.raises(ValueError, match="top-k"):
        CoordinatorSettings.from_run_config({**MINIMAL, "top-k": -1})
    with pytest.raises(ValueError, match="top_k"):
        CoordinatorSettings(spec="s", expected_owners=["a"], top_k=0)  # Python says all experts with None


def test_run_config_values_are_typed_and_named_when_wrong():
    s = CoordinatorSettings.from_run_config(
        {**MINIMAL, "quorum": "1", "train-timeout": "60", "resume": "yes", "router-tuning": "spec", "unknown": 1}
    )
    assert (s.quorum, s.train_timeout, s.resume, s.router_tuning) == (1, 60.0, True, None)
    with pytest.raises(ValueError, match="'quorum' must be int"):
        CoordinatorSettings.from_run_config({**MINIMAL, "quorum": "two"})
    with pytest.raises(ValueError, match="expected-owners"):
        CoordinatorSettings.from_run_config({"spec": "spec.json"})


@pytest.mark.parametrize("value", ["", "maybe", 2])
def test_a_boolean_is_true_or_false_everywhere(value):
    """The coordinator, the owners and the FedAvg app read booleans alike; an empty value is refused."""
    with pytest.raises(ValueError, match="true or false"):
        as_bool(value, "resume")
    with pytest.raises(ValueError, match="share-proxy"):
        OwnerSettings.from_configs({"owner": "a", "data-path": "x", "share-proxy": value}, {})
    with pytest.raises(ValueError, match="save-rounds"):
        FedAvgSettings.from_run_config({"model": "m", "save-rounds": value})
