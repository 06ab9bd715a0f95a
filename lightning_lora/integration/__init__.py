"""LoRA inside Lightning: the pieces a Trainer run needs, for any LightningModule.

Owns: ``LoRAInjectionCallback`` (:mod:`.callback`), adapter-only checkpoints
(``LoRACheckpointMixin``, :mod:`.checkpoint_mixin`), exact and checked resume (``ExactResume``,
:mod:`.exact_resume`, with what it refuses in :mod:`.resume_refusals`; ``ResumableCheckpoint``,
:mod:`.resumable_checkpoint`; the random generators beside torch's they seed, :mod:`.host_random`;
``ResumableDataLoader``, :mod:`.resumable_loader`), reading checkpoints safely
(:mod:`.checkpoint_reader`, :mod:`.safe_checkpoint_io`), which classes a file may name
(:mod:`.class_allowlist`), the CLI class (``LoRACLI``, :mod:`.lora_cli`) and the verbs it runs
(:mod:`.lightning_verbs`), what a failed command leaves behind (:mod:`.failed_run_cleanup`), the run
record for TensorBoard's HParams tab (:mod:`.run_record`), where an evaluation's numbers go
(:mod:`.evaluation_log`), progress lines (:mod:`.line_progress`)
and the list of benign library warnings (:mod:`.benign_warnings`).

May import: Lightning, torch, jsonargparse, ``lightning_lora.core`` and ``lightning_lora.errors``;
never ``demo``, ``experiments`` or ``cli``. Lightning is reached through public doors only
(``tests/test_public_doors.py``). ``checkpoint_reader`` and ``class_allowlist`` import no Lightning,
so the commands that train nothing start fast.
"""
