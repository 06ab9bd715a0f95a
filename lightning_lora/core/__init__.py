"""The LoRA method itself, for any ``nn.Module``: no Lightning anywhere in here.

Owns: ``LoRAConfig`` (:mod:`.config`), the layer family (:mod:`.layers`), which modules a config
adapts (:mod:`.targets`), model surgery (inject, merge, unload: :mod:`.inject`), what a model
holds (:mod:`.model_state`, :mod:`.adapter_tensors`), which adapters run (:mod:`.active_adapters`),
combining and hot-swapping adapters (:mod:`.weighted_merge`, :mod:`.hotswap`), base fingerprints
(:mod:`.fingerprint`), PEFT's file format (:mod:`.peft_format`, its regexes matched by
:mod:`.bounded_regex`), adapter folders (:mod:`.adapter_folder`; their multi-adapter layout:
:mod:`.adapter_layout`), safe file I/O (:mod:`.safe_io`,
:mod:`.write_errors`), LoRA+'s optimizer groups (:mod:`.lora_plus`) and what an adapter learned
(:mod:`.diagnostics`).

May import: torch, safetensors, the standard library, and ``lightning_lora._version``. Nothing
above it (``integration``, ``demo``, ``experiments``, ``cli``); ``tests/test_layout.py`` checks.
"""
