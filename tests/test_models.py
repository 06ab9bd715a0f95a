"""The base networks."""

from __future__ import annotations

import pytest
import torch

from lightning_lora.demo.nets import MLP, RichBoyNet
from lightning_lora.demo.run_loading import build_net, net_spec
from lightning_lora.integration.class_allowlist import UntrustedClassError, allow_classes


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_richboynet_shape_and_size():
    net = RichBoyNet()
    assert n_params(net) == 2_807_010
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert net(torch.randn(3, 784)).shape == (3, 10)


def test_mlp_shape_size_and_validation():
    net = MLP()
    assert n_params(net) == 136_074
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert MLP(hidden_sizes=[16], num_classes=3)(torch.randn(2, 784)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"hidden_sizes must be a non-empty list of positive integers, got \[\]"):
        MLP(hidden_sizes=[])


@pytest.mark.parametrize("net", [RichBoyNet(hidden_size_1=8, hidden_size_2=4), MLP(hidden_sizes=[5, 6])])
def test_nets_rebuild_from_their_spec(net):
    spec = net_spec(net)
    rebuilt = build_net(spec)
    assert type(rebuilt) is type(net)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_build_net_refuses_untrusted_classes_and_non_modules():
    with pytest.raises(UntrustedClassError, match="'os.path' .* nothing was imported"):
        build_net({"class_path": "os.path", "init_args": {}})
    allow_classes(["collections.OrderedDict"])
    with pytest.raises(ValueError, match="'collections.OrderedDict' is not a Module class"):
        build_net({"class_path": "collections.OrderedDict", "init_args": {}})
    with pytest.raises(ValueError, match="dotted 'class_path'"):
        build_net({"init_args": {}})
