"""LoRAConfig: validation that names the field, per-layer settings, and the one field list."""

from __future__ import annotations

import inspect

import pytest

from lightning_lora import LoRAConfig
from lightning_lora.core.config import CALLBACK_ONLY_OPTIONS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be an integer >= 1, got 0"),
        ({"rank": 2.5}, "rank must be an integer >= 1, got 2.5"),
        ({"rank": True}, "rank must be an integer >= 1, got True"),
        ({"alpha": 0}, "alpha must be a finite number > 0, got 0"),
        ({"alpha": -1.0}, "alpha must be a finite number > 0, got -1.0"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0, got nan"),
        ({"alpha": "8"}, "alpha must be a finite number > 0, got '8'"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\), got -0.1"),
        ({"init": "xavier"}, "init must be one of .*got 'xavier'"),
        ({"bias": "some"}, "bias must be one of .*got 'some'"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": "fc1"}, r"target_modules must be a list of module-name patterns \(e.g. \[fc1\]\)"),
        ({"target_modules": ["fc1", ""]}, "target_modules must hold non-empty strings"),
        ({"exclude_modules": "fc1"}, "exclude_modules must be a list"),
        ({"modules_to_save": [3]}, "modules_to_save must hold non-empty strings"),
        ({"use_dora": "yes"}, "use_dora must be true or false, got 'yes'"),
        ({"rank_pattern": {"fc1": 0}}, r"rank_pattern\['fc1'\] must be an integer >= 1, got 0"),
        ({"alpha_pattern": ["fc1"]}, "alpha_pattern must map module-name patterns to values"),
    ],
)
def test_bad_values_name_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=f"LoRAConfig.{message}"):
        LoRAConfig(**kwargs)


def test_scale_plain_and_rslora():
    assert LoRAConfig(rank=4, alpha=8).scale == 2.0
    assert LoRAConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0


def test_per_layer_rank_and_alpha_first_match_wins():
    config = LoRAConfig(rank=2, alpha=4, rank_pattern={"head": 8, "*": 3}, alpha_pattern={"net.fc*": 1})
    assert (config.for_layer("net.head").rank, config.for_layer("net.head").alpha) == (8, 4.0)
    assert (config.for_layer("net.fc1").rank, config.for_layer("net.fc1").alpha) == (3, 1.0)
    assert config.for_layer("x").rank_pattern == {}


def test_dict_round_trip_and_unknown_keys():
    config = LoRAConfig(rank=2, alpha=3, target_modules=("fc1",), use_dora=True, rank_pattern={"fc1": 4})
    assert LoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown LoRAConfig field\(s\) \['lora_r'\]"):
        LoRAConfig.from_dict({**config.to_dict(), "lora_r": 4})


def test_the_callback_signature_mirrors_the_config_fields():
    from lightning_lora.integration.callback import LoRAInjectionCallback

    parameters = list(inspect.signature(LoRAInjectionCallback).parameters.values())
    names = LoRAConfig.field_names()
    assert [p.name for p in parameters[: len(names)]] == names
    assert tuple(p.name for p in parameters[len(names) :]) == CALLBACK_ONLY_OPTIONS
    defaults = LoRAConfig()
    for parameter in parameters[: len(names)]:
        default = parameter.default
        assert default == getattr(defaults, parameter.name) or (
            default is None and not getattr(defaults, parameter.name)
        )
