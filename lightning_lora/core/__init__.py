"""The LoRA method itself, for any ``nn.Module``: no Lightning anywhere in here.

Owns: ``LoRAConfig`` (:mod:`.config`), the layer family (:mod:`.layers`), which modules a config
adapts (:mod:`.targets`), model surgery (inject, merge, unload, disable: :mod:`.inject`), base
fingerprints (:mod:`.fingerprint`), PEFT's file format (:mod:`.peft_format`, its regexes matched by
:mod:`.bounded_regex`), adapter folders (:mod:`.adapter_folder`), safe file I/O (:mod:`.safe_io`,
:mod:`.write_errors`), LoRA+'s optimizer groups (:mod:`.lora_plus`) and what an adapter learned
(:mod:`.diagnostics`).

May import: torch, safetensors, the standard library, and ``lightning_lora._version``. Nothing
above it (``integration``, ``demo``, ``experiments``, ``cli``); ``tests/test_layout.py`` checks.
"""
