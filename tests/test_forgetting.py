"""Forgetting, seen while it happens and fought: target/retain validation, the base cached, distillation.

Tiny MLPs on synthetic MNIST through a real Trainer and TensorBoard logger.
"""

from __future__ import annotations

import functools
import io

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import RecordingLogger, write_base_checkpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lora import LoRAConfig, disable_lora, inject_lora
from lightning_lora.core.layers.base import LoRALayer
from lightning_lora.demo.classifiers import LitClassifier
from lightning_lora.demo.mnist_datamodule import MNISTDataModule
from lightning_lora.demo.nets import MLP
from lightning_lora.errors import UsageError
from lightning_lora.integration.callback import LoRAInjectionCallback


@pytest.fixture
def base_ckpt(tmp_path):
    torch.manual_seed(0)
    return str(write_base_checkpoint(tmp_path / "base.ckpt", MLP(hidden_sizes=[16])))


def model(base_ckpt: str, **kwargs) -> LitClassifier:
    return LitClassifier(MLP(hidden_sizes=[16]), functools.partial(torch.optim.Adam, lr=0.05), base_ckpt, **kwargs)


def trainer(tmp_path, max_steps: int = 8, logger=False, **kwargs) -> pl.Trainer:
    options = dict(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=max_steps, logger=logger, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, val_check_interval=2, num_sanity_val_steps=0,
        callbacks=[LoRAInjectionCallback(rank=2, alpha=4)],
    )  # fmt: skip
    return pl.Trainer(**{**options, **kwargs})


def data(fake_mnist, **kwargs) -> MNISTDataModule:
    return MNISTDataModule(data_dir=str(fake_mnist), batch_size=8, **{"train_digits": [9], **kwargs})


class CountBaseForwards(pl.Callback):
    """Counts forwards of the net while the adapters are disabled (the base's)."""

    def __init__(self) -> None:
        self.base_forwards = 0

    def on_fit_start(self, trainer, pl_module):
        layer = next(m for m in pl_module.net.modules() if isinstance(m, LoRALayer))

        def count(*_):
            self.base_forwards += not layer.enabled

        pl_module.net.register_forward_hook(count)


def test_validation_shows_target_and_retain_with_the_base_computed_once(tmp_path, fake_mnist, base_ckpt):
    counter, logged = CountBaseForwards(), RecordingLogger()
    run = trainer(tmp_path, logger=logged, callbacks=[LoRAInjectionCallback(rank=2, alpha=4), counter])
    lit, dm = model(base_ckpt), data(fake_mnist)
    run.fit(lit, dm)
    metrics = run.callback_metrics
    for name in ("acc", "loss", "acc_base", "loss_base"):
        assert f"val/target/{name}" in metrics and f"val/retain/{name}" in metrics
        assert len(logged.metrics[f"val/retain/{name}"]) == 3  # validations after steps 2, 4 and 7 (5 batches an epoch)
    assert "val/retain/wrong_digit_4_base" in metrics and "val/target/wrong_digit_9" in metrics
    assert not any(k.startswith("val/retain/") and k.endswith("_digit_9") for k in metrics)
    assert counter.base_forwards == 2  # one batch per set (eval batch 1000), once for all validations
    # The cached base numbers are the base's: a plain evaluation of the same base agrees exactly.
    plain = LitClassifier(MLP(hidden_sizes=[16]), base_checkpoint=base_ckpt)
    check = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    results = check.validate(plain, data(fake_mnist), verbose=False)
    assert results[0]["val/target/acc"] == metrics["val/target/acc_base"]
    assert results[1]["val/retain/acc"] == metrics["val/retain/acc_base"]


def test_tensorboard_gets_paired_charts_and_a_mistakes_picture(tmp_path, fake_mnist, base_ckpt):
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer(tmp_path, logger=logger).fit(model(base_ckpt), data(fake_mnist))
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    events.Reload()
    assert events.Tags()["images"] == ["val/mistakes_per_digit"]  # at every validation: the per-digit picture
    validated_at = [image.step for image in events.Images("val/mistakes_per_digit")]
    assert validated_at == [2, 4, 7]  # after optimizer steps 2, 4 and 7 (5 batches an epoch): the global steps
    # one step axis: the picture and the numbers of one validation share its step (Lightning's own is one less)
    assert [s.step for s in events.Scalars("val/target/acc")][:3] == validated_at
    from PIL import Image

    picture = Image.open(io.BytesIO(events.Images("val/mistakes_per_digit")[-1].encoded_image_string))
    assert picture.size == (520, 260) and len(picture.convert("RGB").getcolors(maxcolors=1 << 16)) > 4  # not blank
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["acc: adapter on vs off"] in (
        ["val/retain/acc", "val/retain/acc_base"],
        ["val/target/acc", "val/target/acc_base"],
    )
    titles = {cat.title for cat in layout.category}
    assert {"val/target", "val/retain"} <= titles


def test_distillation_pulls_towards_the_base_computed_with_the_adapter_disabled(tmp_path, fake_mnist, base_ckpt):
    lit = model(base_ckpt, distill_weight=2.0)
    inject_lora(lit.net, LoRAConfig(rank=2, alpha=4))
    with torch.no_grad():
        for layer in (m for m in lit.net.modules() if isinstance(m, LoRALayer)):
            layer.lora_B.normal_(std=0.3)
    lit._target_digits = torch.tensor([9])
    x, y = torch.randn(12, 1, 28, 28), torch.tensor([9, 9, 9, 1, 2, 3, 9, 9, 4, 9, 9, 5])
    loss, _, _, parts = lit.training_loss((x, y))
    retain = y != 9
    with torch.no_grad(), disable_lora(lit.net):
        base = lit.net(x[retain])
    adapted = lit.net(x)
    expected_kl = (F.softmax(base, -1) * (F.log_softmax(base, -1) - F.log_softmax(adapted[retain], -1))).sum(-1).mean()
    assert torch.allclose(parts["distill"], expected_kl, atol=1e-6) and parts["distill"] > 0
    assert torch.allclose(loss, F.cross_entropy(adapted, y) + 2.0 * expected_kl, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for n, p in lit.named_parameters() if "lora_" not in n)


def test_distillation_trains_and_logs_its_parts(tmp_path, fake_mnist, base_ckpt):
    run = trainer(tmp_path, log_every_n_steps=1)
    run.fit(model(base_ckpt, distill_weight=1.0), data(fake_mnist, replay_fraction=0.25))
    assert {"train/ce", "train/distill", "train/loss"} <= set(run.callback_metrics)
    assert run.callback_metrics["train/distill"] > 0


@pytest.mark.parametrize(
    ("model_args", "data_args", "message"),
    [
        ({"distill_weight": 1.0}, {}, "set --data.train_digits and --data.replay_fraction"),
        ({"distill_weight": 1.0}, {"train_digits": None}, "set --data.train_digits and --data.replay_fraction"),
    ],
)
def test_distillation_without_retain_samples_is_refused(
    tmp_path, fake_mnist, base_ckpt, model_args, data_args, message
):
    with pytest.raises(UsageError, match=message):
        trainer(tmp_path).fit(model(base_ckpt, **model_args), data(fake_mnist, **data_args))


def test_distill_on_all_needs_no_replay(tmp_path, fake_mnist, base_ckpt):
    run = trainer(tmp_path, log_every_n_steps=1)
    run.fit(model(base_ckpt, distill_weight=1.0, distill_on="all"), data(fake_mnist))
    assert run.callback_metrics["train/distill"] >= 0


BAD_DISTILLATION = [
    ({"distill_weight": -1}, "distill_weight must be a number >= 0"),
    ({"distill_weight": float("inf")}, "too large: use at most 1e6"),
    ({"distill_weight": 1e39}, "too large: use at most 1e6"),
    ({"distill_on": "others"}, "distill_on must be 'retain' or 'all'"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_DISTILLATION)
def test_bad_distillation_settings(base_ckpt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(base_ckpt, **kwargs)


def test_weakest_is_decided_with_the_base_before_any_adapter(tmp_path, fake_mnist, base_ckpt, caplog):
    dm = MNISTDataModule(data_dir=str(fake_mnist), batch_size=8, train_digits="weakest")
    lit = model(base_ckpt)
    reference = MNISTDataModule(data_dir=str(fake_mnist), batch_size=8, train_digits="weakest")
    expected = reference.pick_weakest(LitClassifier(MLP(hidden_sizes=[16]), base_checkpoint=base_ckpt))
    run = trainer(tmp_path)
    run.fit(lit, dm)
    assert dm.train_digits == [expected]
    assert f"val/target/wrong_digit_{expected}" in run.callback_metrics


def test_replay_and_distillation_resume_exactly(tmp_path, fake_mnist, base_ckpt):
    from lightning_lora import lora_state_dict
    from lightning_lora.integration.exact_resume import ExactResume
    from lightning_lora.integration.resumable_checkpoint import ResumableCheckpoint

    def run(folder, max_steps, ckpt_path=None, every=None):
        pl.seed_everything(0)  # as the command line does for every run: the adapters start alike
        callbacks = [ExactResume(), LoRAInjectionCallback(rank=2, alpha=4, dropout=0.2)]
        if every:
            callbacks.append(ResumableCheckpoint(dirpath=tmp_path / folder, every_n_steps=every))
        lit = model(base_ckpt, distill_weight=1.0)
        trainer(tmp_path / folder, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(every)).fit(
            lit, data(fake_mnist, replay_fraction=0.5), ckpt_path=ckpt_path
        )
        return lora_state_dict(lit.net)

    straight = run("straight", 6)
    run("first", 3, every=3)
    resumed = run("second", 6, ckpt_path=str(tmp_path / "first/last.ckpt"))
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
