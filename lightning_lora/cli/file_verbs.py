"""The verbs that train nothing: ``inspect``, ``export``, ``merge``, ``report``.

None of them imports Lightning, so they start in a fraction of the time ``fit`` needs. They find
runs by name (``runs/finetune_lora`` is its latest version; ``runs/finetune_lora/version_2`` that
one) and read every file as untrusted (:mod:`lightning_lora.integration.checkpoint_reader`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_lora.errors import UsageError
from lightning_lora.integration import class_allowlist

INSPECT = (
    "Show which layers a config adapts, with shapes and added parameters (no data, no training); with --ckpt, "
    "what a fine-tune's adapter learned per layer (size beside the base weight, singular values)."
)
EXPORT = "Write a run's adapter as a PEFT-format folder (adapter_config.json + adapter_model.safetensors)."
MERGE = "Merge a run's adapter into its base and write the plain model as one safetensors file."
REPORT = "Compare a fine-tune with its base on the test split: adapter on, off and merged, per digit."


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are usage errors (one paragraph, exit code 2), not a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message}; see {self.prog} --help")


def _parser(verb: str, description: str) -> _Parser:
    parser = _Parser(prog=f"lightning-lora {verb}", description=description)
    parser.add_argument(
        "--allow-class",
        action="append",
        default=[],
        metavar="DOTTED.PATH",
        help="trust a class of yours that the files name (repeatable); lightning-lora's own are trusted",
    )
    return parser


def _run_options(parser: _Parser, with_out: str | None) -> None:
    parser.add_argument("--ckpt", required=True, help="a fine-tuning run folder (its latest version) or .ckpt")
    parser.add_argument("--base", help="the pretraining run or .ckpt (default: the one the fine-tune recorded)")
    if with_out:
        parser.add_argument("--out", required=True, help=with_out)


def _load_adapted(opts: argparse.Namespace, verb: str):
    from lightning_lora.demo.run_loading import load_run
    from lightning_lora.integration.checkpoint_reader import describe_resolution, describe_run

    class_allowlist.allow_classes(opts.allow_class)
    run = load_run(opts.ckpt, opts.base)
    if not run.adapted:
        raise UsageError(
            f"{run.checkpoint} holds no LoRA adapters (a pretraining run?); {verb} needs a fine-tuning run"
        )
    note = describe_resolution(opts.ckpt, run.checkpoint)
    print(f"lightning-lora {verb}: {note or describe_run(run.checkpoint)}", flush=True)
    return run


def export_command(argv: Sequence[str]) -> int:
    parser = _parser("export", EXPORT)
    _run_options(parser, "the adapter folder to write (a new folder, or an adapter folder to replace)")
    opts = parser.parse_args(argv)
    from lightning_lora.core.active_adapters import lora_adapter_names
    from lightning_lora.core.adapter_folder import layers_peft_gets_wrong, save_adapter

    run = _load_adapted(opts, "export")
    _refuse_another_runs_folder(Path(opts.out), Path(run.checkpoint))
    path = save_adapter(run.net, opts.out)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    wrong = layers_peft_gets_wrong(run.net)
    print(f"adapter written to {path} ({size:,} bytes); {_how_to_load(path, lora_adapter_names(run.net), wrong)}")
    return 0


def _how_to_load(path: Path, names: list[str], wrong: list[str]) -> str:
    """How to load an exported folder: here, or with PEFT (a further adapter from its subfolder)."""
    from lightning_lora.core.layers import DEFAULT_ADAPTER

    if wrong:
        return f"load it with lightning_lora.load_adapter(base, path): PEFT gets {', '.join(wrong)} wrong (see above)"
    if names == [DEFAULT_ADAPTER]:
        return "PEFT loads it with PeftModel.from_pretrained(base, path)"
    first, *others = names
    where = "path" if first == DEFAULT_ADAPTER else f"path/{first}"
    more = "".join(f'.load_adapter(path/{n}, adapter_name="{n}")' for n in others)
    return (
        f"adapters {names} in PEFT's layout; PEFT loads them with PeftModel.from_pretrained(base, {where}, "
        f'adapter_name="{first}"){more}, lightning_lora with load_adapter(base, path, adapter_name=<name>)'
    )


def _run_folder_of(path: Path) -> Path | None:
    """The run folder (``runs/<name>/version_N``: it holds ``checkpoints/`` or ``hparams.yaml``) ``path`` is in."""
    for folder in [path.resolve(), *path.resolve().parents]:
        if (folder / "checkpoints").is_dir() or (folder / "hparams.yaml").is_file():
            return folder
    return None


def _refuse_another_runs_folder(out: Path, checkpoint: Path) -> None:
    """An adapter written into another run's folder would pass for that run's own (its callback writes one there)."""
    target, source = _run_folder_of(out.parent), _run_folder_of(checkpoint)
    if target is not None and target != source:
        raise UsageError(
            f"--out {out} is inside another run's folder ({target}), not the exported run's ({source}): its "
            "adapter would pass for that run's own. Write it elsewhere, e.g. --out adapters/<name>"
        )


def _image_contract(run) -> Any:
    from lightning_lora.demo.merged_model import ImageContract

    return ImageContract() if run.module_class.endswith(".LitClassifier") else None


def merge_command(argv: Sequence[str]) -> int:
    parser = _parser("merge", MERGE + " Load it with lightning_lora.load_merged(path).")
    _run_options(parser, "the file to write, e.g. merged.safetensors (a new file, or a merged file to replace)")
    opts = parser.parse_args(argv)
    from lightning_lora.core.active_adapters import lora_adapter_names
    from lightning_lora.core.inject import merge_and_unload
    from lightning_lora.core.model_state import active_adapter_names
    from lightning_lora.demo.merged_model import write_merged
    from lightning_lora.demo.run_loading import net_spec

    run = _load_adapted(opts, "merge")
    spec = run.hyper_parameters.get("net") or net_spec(run.net)
    held, merged = lora_adapter_names(run.net), active_adapter_names(run.net)
    path = write_merged(opts.out, merge_and_unload(run.net), spec, _image_contract(run))
    which = (
        ""
        if held == merged
        else f" (adapter {merged}, the one the run trained; {[n for n in held if n not in merged]} left out)"
    )
    size = path.stat().st_size
    print(f"merged model written to {path} ({size:,} bytes){which}; load it with lightning_lora.load_merged")
    return 0


def report_command(argv: Sequence[str]) -> int:
    parser = _parser("report", REPORT + " Prints the report and writes summary.md, summary.json and figures.")
    parser.add_argument("--finetuned", default="runs/finetune_lora", help="the fine-tuning run (default: %(default)s)")
    parser.add_argument("--base", help="the pretraining run (default: the one the fine-tune recorded)")
    parser.add_argument("--out", help="the report folder (default: report/ in the fine-tuning run's folder)")
    parser.add_argument("--data-dir", help="folder holding MNIST/raw/ (default: the fine-tune's data_dir)")
    parser.add_argument("--merged", help="a file from `lightning-lora merge` to check against the unmerged model")
    opts = parser.parse_args(argv)
    class_allowlist.allow_classes(opts.allow_class)
    from lightning_lora.experiments.report import report

    _, markdown = report(opts.finetuned, opts.out, opts.base, opts.data_dir, opts.merged)
    print(Path(markdown).read_text())
    return 0


def _merge_configs(paths: Sequence[str]) -> dict[str, Any]:
    """Read YAML configs in order; later ones override earlier ones (lists are replaced), as LightningCLI does."""

    def merge(into: dict, update: dict) -> dict:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value
        return into

    merged: dict[str, Any] = {}
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"config {path} does not exist")
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise UsageError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from err
        except (UnicodeDecodeError, OSError) as err:
            raise UsageError(f"config {path} cannot be read as UTF-8 text ({err})") from err
        if not isinstance(data, dict):
            raise UsageError(f"config {path} must be a YAML mapping")
        merge(merged, data)
    return merged


def _lora_settings(config: dict[str, Any], overrides: list[tuple[str, str]]) -> dict[str, Any] | None:
    """The LoRA settings of a config (its ``lora:`` section or its LoRAInjectionCallback), plus overrides."""
    settings = config.get("lora")
    if isinstance(settings, dict):
        settings = dict(settings.get("init_args", settings))
    else:
        callbacks = (config.get("trainer") or {}).get("callbacks") or []
        found = [
            c
            for c in callbacks
            if isinstance(c, dict) and str(c.get("class_path", "")).rsplit(".", 1)[-1] == "LoRAInjectionCallback"
        ]
        settings = dict(found[0].get("init_args") or {}) if found else None
    if overrides:
        settings = dict(settings or {})
        for key, raw in overrides:
            settings[key] = yaml.safe_load(raw)
    return settings


def inspect_command(argv: Sequence[str]) -> int:
    from lightning_lora.core.config import LoRAConfig

    parser = _parser("inspect", INSPECT)
    parser.add_argument("-c", "--config", action="append", help="YAML config (repeatable)")
    parser.add_argument("--ckpt", help="a fine-tuning run folder (its latest version) or .ckpt: its adapter's numbers")
    parser.add_argument(
        "--adapter", help="an adapter folder (every adapter in it; PEFT's layout): its numbers on --base"
    )
    parser.add_argument(
        "--base", help="the pretraining run or .ckpt (with --ckpt: default the one it recorded; with --adapter: needed)"
    )
    parser.epilog = "LoRA settings override the config's as in fit: " + ", ".join(
        f"--lora.{name}" for name in LoRAConfig.field_names()
    )
    opts, rest = parser.parse_known_args(argv)
    if sum(bool(v) for v in (opts.config, opts.ckpt, opts.adapter)) != 1:
        raise UsageError(
            "inspect takes -c CONFIG (what a config would adapt), --ckpt RUN (what a fine-tune learned) or "
            "--adapter FOLDER --base PRETRAIN_RUN (what a saved adapter learned)"
        )
    if opts.ckpt or opts.adapter:
        if rest:
            raise UsageError(
                f"unrecognised option {rest[0]!r}; inspect --ckpt/--adapter takes --base and --allow-class"
            )
        return _inspect_adapter(opts)
    overrides = _lora_overrides(rest)
    config = _merge_configs(opts.config)
    class_allowlist.allow_classes(
        path for _, path in class_allowlist.class_paths_in(config)
    )  # the user's own config names them
    model = config.get("model") or {}
    net_config = (model.get("init_args") or model).get("net")
    if not isinstance(net_config, dict):
        raise UsageError("the config has no model.net with class_path and init_args")
    settings = _lora_settings(config, overrides)
    if settings is None:
        raise UsageError("the config has no 'lora:' section or LoRAInjectionCallback: nothing would be injected")
    from lightning_lora.core.adapter_tensors import count_parameters
    from lightning_lora.core.inject import inject_checked, lora_layers
    from lightning_lora.demo.run_loading import build_net

    names = set(LoRAConfig.field_names())
    try:
        lora = LoRAConfig(**{k: v for k, v in settings.items() if k in names and v is not None})
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from err
    net = build_net(net_config, "model.net")
    try:  # a pattern that matches nothing, a layer that cannot be adapted: a usage error, as in fit
        skipped = inject_checked(net, lora, "these LoRA settings").describe_skipped()
    except ValueError as err:
        raise UsageError(str(err)) from err
    rows = [
        (
            name,
            " x ".join(str(d) for d in layer.base_weight().shape),
            type(layer.base_layer).__name__,
            sum(p.numel() for p in layer.lora_adapters.parameters()),
        )
        for name, layer in lora_layers(net)
    ]
    width = max(len(r[0]) for r in [*rows, ("module", "", "", 0)])
    print(f"{'module':<{width}}  {'type':<22} {'weight shape':>16}  {'adds':>10}")
    for name, shape, kind, added in rows:
        print(f"{name:<{width}}  {kind:<22} {shape:>16}  {added:>10,}")
    print(f"{lora}\n{count_parameters(net)}")
    if skipped:
        print(skipped)
    return 0


def _inspect_adapter(opts: argparse.Namespace) -> int:
    """Per adapted layer: rank, ||scale B A|| / ||W||, effective rank and the largest singular values."""
    from lightning_lora.core.diagnostics import adapter_stats

    net = _net_with_folder(opts) if opts.adapter else _load_adapted(opts, "inspect").net
    stats = adapter_stats(net)
    width = max(len("module"), *(len(s.name) for s in stats))
    print(f"{'module':<{width}}  {'adapter':<8} {'rank':>4}  {'delta/W':>9}  {'eff. rank':>9}  singular values")
    for s in stats:
        shown = ", ".join(f"{v:.3g}" for v in s.singular_values[:8]) + (", ..." if len(s.singular_values) > 8 else "")
        numbers = f"{s.rank:>4}  {s.delta_norm_ratio:>9.3g}  {s.effective_rank:>9.2f}"
        print(f"{s.name:<{width}}  {s.adapter:<8} {numbers}  {shown}")
    print("delta/W: ||scale B A|| / ||W|| (Frobenius); eff. rank: exp(entropy) of the singular values (1: collapsed)")
    return 0


def _net_with_folder(opts: argparse.Namespace):
    """The base net of ``--base`` holding every adapter of the folder ``--adapter`` (its root and subfolders)."""
    from lightning_lora.core.adapter_folder import load_adapter
    from lightning_lora.core.adapter_layout import folder_adapter_names
    from lightning_lora.demo.run_loading import load_base_net

    if not opts.base:
        raise UsageError("inspect --adapter needs --base: the pretraining run or .ckpt the adapter was trained on")
    folder = Path(opts.adapter)
    if not folder.is_dir():
        raise UsageError(f"--adapter {folder} does not exist or is not a folder; give an adapter folder")
    names = folder_adapter_names(folder)
    if not names:
        raise UsageError(f"{folder} holds no adapter (adapter_config.json at its root or in a subfolder)")
    class_allowlist.allow_classes(opts.allow_class)
    net = load_base_net(opts.base)
    try:
        for name in names:
            load_adapter(net, folder, adapter_name=name)
    except (FileNotFoundError, ValueError) as err:  # another base, a broken file: the message says which
        python_only = ", or pass check_base=False to load it anyway."
        raise UsageError(str(err).replace(python_only, " (--base: the pretraining run it was trained on).")) from err
    print(f"lightning-lora inspect: {folder} ({', '.join(names)}) on {opts.base}", flush=True)
    return net


def _lora_overrides(rest: list[str]) -> list[tuple[str, str]]:
    """``--lora.rank 4`` style options, as fit takes them (the callback-only ones change nothing here)."""
    from lightning_lora.core.config import CALLBACK_ONLY_OPTIONS, LoRAConfig

    accepted = (*LoRAConfig.field_names(), *CALLBACK_ONLY_OPTIONS)
    overrides, i = [], 0
    while i < len(rest):
        option = rest[i]
        key, equals, value = option.partition("=")
        if not key.startswith("--lora.") or key[len("--lora.") :] not in accepted:
            raise UsageError(f"unrecognised option {option!r}; inspect takes -c CONFIG and --lora.<field> VALUE")
        if not equals:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise UsageError(f"{key} needs a value")
            value, i = rest[i + 1], i + 1
        i += 1
        if not value.strip():
            raise UsageError(f"{key} needs a value, got {value!r}")
        if key[len("--lora.") :] in LoRAConfig.field_names():  # the others change where or when, not what
            overrides.append((key[len("--lora.") :], value))
    return overrides
