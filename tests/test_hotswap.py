"""Hot-swapping an adapter's values in place: eager and compiled models give the new adapter's outputs,
compiled ones without compiling again; what does not fit is refused and changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LAYER_ZOO, move_adapters, zoo_model
from torch import nn

from lightning_lora import (
    LoRAConfig,
    hotswap_adapter,
    inject_lora,
    load_adapter,
    prepare_hotswap,
    save_adapter,
)

KINDS = list(LAYER_ZOO)


def trained(base: nn.Module, seed: int, **config) -> nn.Module:
    model = inject_lora(
        copy.deepcopy(base), LoRAConfig(**{"rank": 2, "alpha": 4, "target_modules": ["layer"], **config})
    )
    return move_adapters(model, seed).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_a_swap_of_another_rank_and_scale_gives_the_new_adapter_s_outputs_on_every_layer_type(kind, tmp_path):
    base, x = zoo_model(kind)
    model = trained(base, seed=1)
    new = trained(base, seed=2, rank=3, alpha=1.5)
    save_adapter(new, tmp_path / "new")
    with torch.no_grad():
        before = model(x)
        prepare_hotswap(model, max_rank=4)
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)  # the padding adds nothing
        hotswap_adapter(model, tmp_path / "new")
        torch.testing.assert_close(model(x), new(x), atol=1e-5, rtol=1e-5)


def test_a_compiled_model_gives_the_swapped_adapter_s_outputs_without_compiling_again(tmp_path):
    base, x = zoo_model("linear_3d_no_bias")
    model = trained(base, seed=1)
    for seed, rank, alpha in ((2, 3, 1.5), (3, 1, 8.0)):
        save_adapter(trained(base, seed=seed, rank=rank, alpha=alpha), tmp_path / f"a{seed}")
    prepare_hotswap(model, max_rank=4)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile would raise here
            for seed in (2, 3):
                hotswap_adapter(compiled, tmp_path / f"a{seed}")
                expected = load_adapter(copy.deepcopy(base), tmp_path / f"a{seed}")(x)
                torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


def test_without_preparing_a_larger_rank_is_refused_naming_prepare_hotswap(tmp_path):
    base, x = zoo_model("linear")
    model = trained(base, seed=1)
    save_adapter(trained(base, seed=2, rank=5), tmp_path / "big")
    out = model(x)
    with pytest.raises(ValueError, match=r"rank 5 at layer 'layer', above the 2.*prepare_hotswap\(model, max_rank=5\)"):
        hotswap_adapter(model, tmp_path / "big")
    assert torch.equal(model(x), out)
    save_adapter(trained(base, seed=3, rank=1), tmp_path / "small")  # a smaller rank fits as it is
    hotswap_adapter(model, tmp_path / "small")
    torch.testing.assert_close(model(x), load_adapter(copy.deepcopy(base), tmp_path / "small")(x))


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (LoRAConfig(rank=2, target_modules=["a"]), "does not adapt the layers adapter 'default' adapts"),
        (LoRAConfig(rank=2, use_dora=True), "is a DoRA adapter and .default. a plain LoRA one"),
        (LoRAConfig(rank=2, bias="all"), "trains biases or modules_to_save"),
        (LoRAConfig(rank=2, dropout=0.1), r"dropout=0.1 and adapter 'default' dropout=0.0.*same dropout"),
        (LoRAConfig(rank=2, use_rslora=True), r"use_rslora=True and adapter 'default' use_rslora=False"),
    ],
)
def test_a_folder_that_does_not_fit_is_refused_and_changes_nothing(tmp_path, other, message):
    base = Two().requires_grad_(False)
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2))
    save_adapter(inject_lora(copy.deepcopy(base), other), tmp_path / "other")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        hotswap_adapter(model, tmp_path / "other")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        hotswap_adapter(model, tmp_path / "other", adapter_name="zz")


def test_a_named_adapter_is_swapped_from_its_subfolder_and_the_others_are_untouched(tmp_path):
    base = Two().requires_grad_(False)
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2))
    inject_lora(model, LoRAConfig(rank=2), adapter_name="b")
    source = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if ".b." in name:
                p.normal_()
    save_adapter(source, tmp_path / "both")
    default_before = {k: v.clone() for k, v in model.state_dict().items() if ".default." in k}
    hotswap_adapter(model, tmp_path / "both", adapter_name="b")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in default_before.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items() if ".b." in k)


def test_prepare_hotswap_refuses_a_max_rank_below_an_adapter_s():
    model = inject_lora(Two(), LoRAConfig(rank=4))
    with pytest.raises(ValueError, match="rank 4, above max_rank=2"):
        prepare_hotswap(model, max_rank=2)


def test_outputs_equal_peft_s_hotswap_adapter(tmp_path):
    from helpers import require

    peft = require("peft")
    hotswap = require("peft.utils.hotswap")
    base, x = zoo_model("linear")
    model = trained(base, seed=1)
    save_adapter(model, tmp_path / "first")
    save_adapter(trained(base, seed=2, rank=3, alpha=1.5), tmp_path / "second")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "first").eval()
    hotswap.prepare_model_for_compiled_hotswap(theirs, target_rank=4)
    prepare_hotswap(model, max_rank=4)
    hotswap.hotswap_adapter(theirs, str(tmp_path / "second"), adapter_name="default")
    hotswap_adapter(model, tmp_path / "second")
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_a_merged_adapter_is_swapped_into_the_weight_too(tmp_path):
    base, x = zoo_model("linear")
    model = trained(base, seed=1)
    new = trained(base, seed=2)
    save_adapter(new, tmp_path / "new")
    with torch.no_grad():
        from lightning_lora import merge_lora, unmerge_lora

        merge_lora(model)
        hotswap_adapter(model, tmp_path / "new")
        assert model.layer.merged_adapters == ["default"]
        torch.testing.assert_close(model(x), new(x), atol=1e-6, rtol=1e-6)  # the weight holds the new update
        unmerge_lora(model)
        torch.testing.assert_close(model(x), new(x), atol=1e-6, rtol=1e-6)
        assert torch.equal(model.layer.weight, base.layer.weight)


def test_a_name_the_folder_lacks_is_refused_not_read_from_its_root(tmp_path):
    base = Two().requires_grad_(False)
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2))
    inject_lora(model, LoRAConfig(rank=2), adapter_name="b")
    inject_lora(model, LoRAConfig(rank=2), adapter_name="c")
    save_adapter(model, tmp_path / "two", adapter_names=["default", "b"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"holds adapters \['default', 'b'\], none named 'c'.*subfolder='<name>', '' for the root's"
    ):
        hotswap_adapter(model, tmp_path / "two", adapter_name="c")
    (tmp_path / "two" / "b" / "adapter_model.safetensors").unlink()  # a damaged subfolder is not skipped
    with pytest.raises(FileNotFoundError, match="two/b"):
        hotswap_adapter(model, tmp_path / "two", adapter_name="b")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    hotswap_adapter(model, tmp_path / "two", adapter_name="c", subfolder="")  # the root's, asked for by name
    assert all(torch.equal(model.state_dict()[k.replace(".default.", ".c.")], v)
               for k, v in state.items() if ".default." in k)  # fmt: skip


def test_a_pissa_adapter_swaps_only_with_one_of_the_same_init_and_ranks_and_damaged_folders_are_refused(tmp_path):
    import json

    from helpers import TwoLinear
    from safetensors.torch import load_file, save_file

    base = TwoLinear().requires_grad_(False)
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, init="pissa"))
    prepare_hotswap(model, max_rank=4)
    for name, config in {"r4": LoRAConfig(rank=4, init="pissa"), "olora": LoRAConfig(rank=2, init="olora")}.items():
        save_adapter(inject_lora(copy.deepcopy(base), config), tmp_path / name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="has rank 4 at layer 'fc1' and adapter 'default' \\(pissa\\) rank 2"):
        hotswap_adapter(model, tmp_path / "r4")
    with pytest.raises(ValueError, match="is a olora adapter and 'default' a pissa one"):
        hotswap_adapter(model, tmp_path / "olora")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())

    plain = trained(base, seed=1, target_modules=["fc1", "fc2"])
    save_adapter(trained(base, seed=2, target_modules=["fc1", "fc2"]), tmp_path / "damaged")
    config = json.loads((tmp_path / "damaged" / "adapter_config.json").read_text())
    (tmp_path / "damaged" / "adapter_config.json").write_text(json.dumps({**config, "r": 9}))
    with pytest.raises(ValueError, match="holds rank-2 factors at layer 'fc1', but its config says rank 9"):
        hotswap_adapter(plain, tmp_path / "damaged")
    (tmp_path / "damaged" / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "damaged" / "adapter_model.safetensors")
    save_file({k: (v * 100).long() for k, v in tensors.items()}, tmp_path / "damaged" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="holds torch.int64 factors at layer 'fc1', not a float type"):
        hotswap_adapter(plain, tmp_path / "damaged", check_base=False)
