"""The MNIST demo: what ``make demo`` trains, and the classes its configs name.

Owns: the base networks (:mod:`.nets`), MNIST's files and DataModule (:mod:`.mnist_files`,
:mod:`.batch_data`, :mod:`.mnist_datamodule`), the low-rank-shift task (:mod:`.shift_datamodule`),
the LightningModules (:mod:`.net_module`, :mod:`.classifiers`), per-digit metrics and their
pictures (:mod:`.digit_metrics`; at every validation :mod:`.live_bars`), rebuilding a run's network from its checkpoint
(:mod:`.run_loading`) and the merged-model file (:mod:`.merged_model`).

May import: ``lightning_lora.core``, ``lightning_lora.integration``, ``lightning_lora.errors``,
Lightning, torch, torchvision, torchmetrics, matplotlib, Pillow; never ``experiments`` or ``cli``.
"""
