"""LoRAInjectionCallback inside real Trainer runs on synthetic MNIST."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import RecordAdapters, write_base_checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lora import LoRALayer, disable_lora, get_lora_config, load_adapter, lora_state_dict
from lightning_lora.demo.classifiers import LitClassifier
from lightning_lora.demo.mnist_datamodule import MNISTDataModule
from lightning_lora.demo.nets import MLP
from lightning_lora.errors import UsageError
from lightning_lora.integration.callback import LoRAInjectionCallback

HIDDEN = [32]


@pytest.fixture
def base_ckpt(tmp_path):
    torch.manual_seed(1)
    return str(write_base_checkpoint(tmp_path / "base.ckpt", MLP(hidden_sizes=HIDDEN)))


def make_model(base_ckpt: str | None, lr: float = 0.01) -> LitClassifier:
    optimizer = functools.partial(torch.optim.Adam, lr=lr)  # picklable, for ddp_spawn
    return LitClassifier(MLP(hidden_sizes=HIDDEN), optimizer=optimizer, base_checkpoint=base_ckpt)


def make_trainer(tmp_path, callbacks, max_steps: int = 6, **kwargs) -> pl.Trainer:
    options = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def data(fake_mnist, **kwargs) -> MNISTDataModule:
    return MNISTDataModule(data_dir=str(fake_mnist), batch_size=16, **kwargs)


def lora(**kwargs) -> LoRAInjectionCallback:
    return LoRAInjectionCallback(rank=2, alpha=4, **kwargs)


def test_optimizer_holds_exactly_the_adapters_and_base_is_untouched(tmp_path, fake_mnist, base_ckpt):
    model = make_model(base_ckpt)
    base = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer = make_trainer(tmp_path, [lora()])
    trainer.fit(model, data(fake_mnist, train_digits=[9]))
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    adapters = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert held == {id(p) for p in adapters.values()} and len(adapters) == 4
    for key, value in base.items():
        assert torch.equal(model.net.state_dict()[key], value), key
    assert all(torch.count_nonzero(p) > 0 for n, p in adapters.items() if n.endswith("lora_B"))


def test_an_optimizer_over_all_parameters_is_refused_naming_the_cause(tmp_path, fake_mnist, base_ckpt):
    class AllParameters(LitClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = AllParameters(MLP(hidden_sizes=HIDDEN), base_checkpoint=base_ckpt)
    message = r"holds 4 frozen parameter\(s\) .*built from all parameters \(self.parameters\(\)\).*requires_grad"
    with pytest.raises(UsageError, match=message):
        make_trainer(tmp_path, [lora()]).fit(model, data(fake_mnist))


def test_an_optimizer_built_before_injection_is_refused_naming_the_cause(tmp_path, fake_mnist, base_ckpt):
    class EarlyOptimizer(LitClassifier):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.early = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

        def configure_optimizers(self):
            return self.early

    model = EarlyOptimizer(MLP(hidden_sizes=HIDDEN), base_checkpoint=base_ckpt)
    message = r"lacks 4 trainable parameter\(s\) .*built before the adapters existed"
    with pytest.raises(UsageError, match=message):
        make_trainer(tmp_path, [lora()]).fit(model, data(fake_mnist))


def test_resume_with_ckpt_path_restores_strictly_and_continues(tmp_path, fake_mnist, base_ckpt):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3, save_top_k=-1)
    first = make_model(base_ckpt)
    make_trainer(tmp_path, [lora(), checkpoints], max_steps=3).fit(first, data(fake_mnist))
    resumed = make_model(base_ckpt)
    trainer = make_trainer(tmp_path, [lora()], max_steps=6)
    trainer.fit(resumed, data(fake_mnist), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 6 and resumed.strict_loading
    assert not torch.equal(resumed.net.layers[0].lora_B, first.net.layers[0].lora_B)
    with pytest.raises(ValueError, match="use the LoRA settings of the run that wrote it"):
        make_trainer(tmp_path, [LoRAInjectionCallback(rank=3)], max_steps=6).fit(
            make_model(base_ckpt), data(fake_mnist), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )


def test_pretrain_checkpoint_as_ckpt_path_explains_base_checkpoint(tmp_path, fake_mnist):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "pre", save_last=True)
    make_trainer(tmp_path, [checkpoints], max_steps=2).fit(make_model(None), data(fake_mnist))
    with pytest.raises(ValueError, match="pretraining checkpoint passed as --ckpt_path.*--model.base_checkpoint"):
        make_trainer(tmp_path, [lora()]).fit(
            make_model(None), data(fake_mnist), ckpt_path=str(tmp_path / "pre/last.ckpt")
        )


def test_load_from_checkpoint_needs_no_callback(tmp_path, fake_mnist, base_ckpt):
    model = make_model(base_ckpt)
    make_trainer(tmp_path, [lora(use_dora=True), ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)]).fit(
        model, data(fake_mnist)
    )
    restored = LitClassifier.load_from_checkpoint(tmp_path / "c" / "last.ckpt")
    assert get_lora_config(restored.net) == get_lora_config(model.net) and restored.strict_loading
    x = torch.randn(5, 1, 28, 28)
    model.eval()
    restored.eval()
    assert torch.equal(restored(x), model(x))


def test_adapter_is_saved_at_fit_end_and_reproduces_predictions(tmp_path, fake_mnist, base_ckpt):
    model = make_model(base_ckpt)
    make_trainer(tmp_path, [lora(adapter_dir=str(tmp_path / "adapter"))]).fit(model, data(fake_mnist))
    fresh = make_model(base_ckpt)
    load_adapter(fresh.net, tmp_path / "adapter")
    x = torch.randn(7, 1, 28, 28)
    assert torch.equal(fresh(x), model(x))


def test_default_adapter_dir_is_in_the_log_dir(tmp_path, fake_mnist, base_ckpt):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path / "runs", name="ft")
    make_trainer(tmp_path, [lora()], logger=logger).fit(make_model(base_ckpt), data(fake_mnist))
    assert (tmp_path / "runs" / "ft" / "version_0" / "adapter" / "adapter_model.safetensors").is_file()


def test_merge_on_fit_end(tmp_path, fake_mnist, base_ckpt):
    model = make_model(base_ckpt)
    trainer = make_trainer(tmp_path, [lora(merge_on_fit_end=True)])
    trainer.fit(model, data(fake_mnist))
    layers = [m for m in model.modules() if isinstance(m, LoRALayer)]
    assert layers and all(m.merged for m in layers)
    merged_acc = trainer.test(model, data(fake_mnist), verbose=False)[0]["test/acc"]
    for layer in layers:
        layer.unmerge()
    assert trainer.test(model, data(fake_mnist), verbose=False)[0]["test/acc"] == merged_acc


def test_the_module_logs_the_base_models_numbers_beside_the_adapters(tmp_path, fake_mnist, base_ckpt):
    model = make_model(base_ckpt, lr=0.05)
    trainer = make_trainer(tmp_path, [lora()], max_steps=10)
    trainer.fit(model, data(fake_mnist, train_digits=[3]))
    assert {"val/target/acc_base", "val/target/loss_base", "val/target/wrong_digit_3_base"} <= set(
        trainer.callback_metrics
    )
    assert {"val/retain/acc", "val/retain/acc_base"} <= set(trainer.callback_metrics)
    results = trainer.test(model, data(fake_mnist), verbose=False)[0]
    base_trainer = make_trainer(tmp_path, [])
    base_results = base_trainer.test(make_model(base_ckpt), data(fake_mnist), verbose=False)[0]
    for digit in range(10):
        assert results[f"test/wrong_digit_{digit}_base"] == base_results[f"test/wrong_digit_{digit}"]
    assert results["test/acc_base"] == base_results["test/acc"]
    assert results["test/acc"] != results["test/acc_base"]


def test_bf16_mixed_trains_with_fp32_adapters(tmp_path, fake_mnist, base_ckpt):
    model = make_model(base_ckpt)
    trainer = make_trainer(tmp_path, [lora()], precision="bf16-mixed")
    trainer.fit(model, data(fake_mnist))
    assert trainer.precision == "bf16-mixed" and trainer.state.finished
    adapters = lora_state_dict(model.net)
    assert all(t.dtype == torch.float32 for t in adapters.values())
    assert all(torch.count_nonzero(t) > 0 for k, t in adapters.items() if k.endswith("lora_B"))


def test_setup_is_idempotent_across_stages(tmp_path, fake_mnist, base_ckpt):
    model = make_model(base_ckpt)
    callback = lora()
    trainer = make_trainer(tmp_path, [callback])
    trainer.fit(model, data(fake_mnist))
    layer = model.net.layers[0]
    trainer.validate(model, data(fake_mnist), verbose=False)
    trainer.test(model, data(fake_mnist), verbose=False)
    assert model.net.layers[0] is layer
    with disable_lora(model.net):
        pass


def test_ddp_spawn_two_cpu_processes_keep_identical_adapters(tmp_path, fake_mnist, base_ckpt):
    record = RecordAdapters(str(tmp_path / "ranks"))
    trainer = make_trainer(tmp_path, [lora(), record], strategy="ddp_spawn", devices=2, max_steps=4)
    trainer.fit(make_model(base_ckpt), data(fake_mnist))
    assert trainer.state.finished
    rank0 = torch.load(tmp_path / "ranks" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ranks" / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and len(rank0) == 4
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(torch.count_nonzero(v) > 0 for k, v in rank0.items() if k.endswith("lora_B"))


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, fake_mnist, base_ckpt):
    from lightning_lora.errors import NonFiniteLossError

    model = make_model(base_ckpt, lr=1e30)  # Adam moves every adapter weight by ~lr: the loss overflows soon
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(tmp_path, [lora(), checkpoints], max_steps=40)
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf) at step \d+ .*learning rate too high"):
        trainer.fit(model, data(fake_mnist))
    assert trainer.global_step < 40
    written = sorted((tmp_path / "ck").glob("*.ckpt"))
    assert written, "at least the first good steps were checkpointed"
    for path in written:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values()), path.name


def test_adapter_stats_go_to_tensorboard_every_n_optimizer_steps(tmp_path, fake_mnist, base_ckpt):
    """Scalars (delta_norm_ratio, effective_rank) and a histogram of singular values per layer, once per optimizer
    step it falls on, also under gradient accumulation; the last values are the trained adapter's own."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_lora import adapter_stats

    logger = TensorBoardLogger(tmp_path, name="stats", default_hp_metric=False)
    model = make_model(base_ckpt)
    trainer = make_trainer(tmp_path, [lora(stats_every_n_steps=2)], max_steps=6, logger=logger,
                           accumulate_grad_batches=2, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, data(fake_mnist))
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    final = {s.name: s for s in adapter_stats(model.net)}
    assert final, "nothing adapted"
    for name, stats in final.items():
        ratios = events.Scalars(f"adapter_stats/default/{name}/delta_norm_ratio")
        assert [s.step for s in ratios] == [2, 4, 6]
        assert ratios[-1].value == pytest.approx(stats.delta_norm_ratio, rel=1e-5) and ratios[-1].value > 0
        rank = events.Scalars(f"adapter_stats/default/{name}/effective_rank")[-1].value
        assert rank == pytest.approx(stats.effective_rank)
        histogram = events.Histograms(f"adapter_stats/default/{name}/singular_values")
        assert [h.step for h in histogram] == [2, 4, 6] and histogram[-1].histogram_value.num == 2  # rank 2
    # A second adapter trained beside the first: only its own stats, under its own name, no collisions.
    logger = TensorBoardLogger(tmp_path, name="second", default_hp_metric=False)
    second = lora(
        stats_every_n_steps=2, adapter_name="b", load_adapters={"default": str(Path(trainer.log_dir) / "adapter")}
    )
    make_trainer(tmp_path, [second], max_steps=2, logger=logger, limit_val_batches=0).fit(
        make_model(base_ckpt), data(fake_mnist))  # fmt: skip
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()["scalars"] + events.Tags()["histograms"]
    stats_tags = {t for t in tags if t.startswith("adapter_stats/")}
    assert stats_tags and all(t.startswith("adapter_stats/b/") for t in stats_tags)
    assert len(stats_tags) == 3 * len(final)


def test_stats_every_n_steps_must_be_a_count():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="stats_every_n_steps must be an integer >= 0"):
            lora(stats_every_n_steps=bad)
