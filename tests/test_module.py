"""LitClassifier: optimizer, base checkpoints, checkpoint round trips, the shared step."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import write_base_checkpoint

from lightning_lora import LoRAConfig, inject_lora
from lightning_lora.demo.classifiers import LitClassifier
from lightning_lora.demo.nets import MLP, RichBoyNet


def test_optimizer_gets_only_trainable_parameters():
    model = LitClassifier(MLP(hidden_sizes=[8]))
    inject_lora(model.net, LoRAConfig(rank=2))
    optimizer = model.configure_optimizers()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad} and len(held) == 4
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 1e-3


def test_nothing_to_train_is_an_error():
    model = LitClassifier(MLP(hidden_sizes=[8]))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train: every parameter is frozen"):
        model.configure_optimizers()


def test_base_checkpoint_loads_bit_identical(tmp_path):
    base = MLP(hidden_sizes=[8])
    path = write_base_checkpoint(tmp_path / "base.ckpt", base)
    model = LitClassifier(MLP(hidden_sizes=[8]), base_checkpoint=str(path))
    for key, value in base.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value)


class TestBaseCheckpointErrors:
    def test_missing(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="base_checkpoint .*nope.ckpt does not exist"):
            LitClassifier(MLP(), base_checkpoint=str(tmp_path / "nope.ckpt"))

    def test_not_a_checkpoint(self, tmp_path):
        (tmp_path / "x.ckpt").write_text("hello")
        with pytest.raises(ValueError, match="is not a PyTorch checkpoint at all .* a text file"):
            LitClassifier(MLP(), base_checkpoint=str(tmp_path / "x.ckpt"))

    def test_truncated(self, tmp_path):
        path = write_base_checkpoint(tmp_path / "base.ckpt", MLP(hidden_sizes=[8]))
        path.write_bytes(path.read_bytes()[:1000])
        with pytest.raises(ValueError, match="may be truncated"):
            LitClassifier(MLP(hidden_sizes=[8]), base_checkpoint=str(path))

    def test_no_state_dict(self, tmp_path):
        torch.save({"weights": torch.zeros(1)}, tmp_path / "w.ckpt")
        with pytest.raises(ValueError, match="has no 'state_dict'"):
            LitClassifier(MLP(), base_checkpoint=str(tmp_path / "w.ckpt"))

    def test_other_architecture_names_keys_and_shapes(self, tmp_path):
        path = write_base_checkpoint(tmp_path / "base.ckpt", MLP(hidden_sizes=[8]))
        with pytest.raises(ValueError) as err:
            LitClassifier(MLP(hidden_sizes=[16]), base_checkpoint=str(path))
        assert "shape mismatches layers.0.weight: file (8, 784) vs net (16, 784)" in str(err.value)
        with pytest.raises(ValueError, match=r"missing keys \['linear1.bias'.*unexpected keys \['layers.0.bias'"):
            LitClassifier(RichBoyNet(), base_checkpoint=str(path))

    def test_pickle_with_code_is_refused_and_not_run(self, tmp_path):
        marker = tmp_path / "ran"

        class Exploit:
            def __reduce__(self):
                return (marker.write_text, ("pwned",))

        (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": Exploit()}))
        with pytest.raises(ValueError, match="not a readable checkpoint"):
            LitClassifier(MLP(), base_checkpoint=str(tmp_path / "evil.ckpt"))
        assert not marker.exists()


def test_num_classes_mismatch_is_named():
    model = LitClassifier(MLP(hidden_sizes=[8], num_classes=3), num_classes=10)
    with pytest.raises(ValueError, match="net outputs 3 classes but num_classes is 10"):
        model.model_step((torch.randn(2, 784), torch.tensor([0, 1])))


def test_hparams_describe_the_net_without_pickling_it():
    model = LitClassifier(MLP(hidden_sizes=[8]), base_checkpoint=None)
    assert model.hparams["net"] == {
        "class_path": "lightning_lora.demo.nets.MLP",
        "init_args": {"hidden_sizes": [8], "num_features": 784, "num_classes": 10},
    }
    rebuilt = LitClassifier(**model.hparams)
    assert isinstance(rebuilt.net, MLP)


def test_checkpoints_hold_the_adapter_and_rebuild_on_the_modules_own_base():
    def module() -> LitClassifier:
        torch.manual_seed(0)  # the module's own __init__ provides the same base every time
        return LitClassifier(MLP(hidden_sizes=[8]))

    model = module()
    config = LoRAConfig(rank=3, use_dora=True)
    inject_lora(model.net, config)
    with torch.no_grad():
        model.net.layers[0].lora_B.normal_()
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {
        f"net.layers.{i}.lora_adapters.default.lora_{x}" for i in (0, 2) for x in ("A", "B", "magnitude")
    }
    fresh = module()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    x = torch.randn(4, 784)
    assert torch.equal(fresh(x), model(x))
    other = module()
    inject_lora(other.net, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="use the LoRA settings of the run that wrote it"):
        other.on_load_checkpoint(checkpoint)


@pytest.mark.parametrize(("accumulate", "every"), [(1, 4), (3, 4), (1, 0)])
def test_step_values_reach_the_loggers_at_the_modules_own_cadence(tmp_path, fake_mnist, accumulate, every):
    """Step 1 and every ``log_every_n_steps``-th optimizer step, once each, whatever the accumulation."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger

    from lightning_lora.demo.mnist_datamodule import MNISTDataModule

    class Recorder(Logger):
        name, version = "recorder", 0
        steps: list = []

        def log_metrics(self, metrics, step=None):
            if "train/loss" in metrics:
                self.steps.append(step)

        def log_hyperparams(self, *args, **kwargs):
            pass

    recorder = Recorder()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=9,
        log_every_n_steps=every,
        accumulate_grad_batches=accumulate,
        logger=recorder,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(LitClassifier(MLP(hidden_sizes=[8])), MNISTDataModule(data_dir=str(fake_mnist), batch_size=8))
    assert recorder.steps == ([1, 4, 8] if every else [])
