"""The README's results, generated from the experiments' records (``benchmarks/results/*.json``).

``make readme`` (``python -m lightning_lora.experiments.readme``; ``make results`` runs it after
every experiment) rewrites every block of the
README (and of ``benchmarks/RESULTS.md``) between ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->`` from the record it names;
``--check`` only says whether the README is up to date (``tests/test_readme.py`` runs it). The
numbers are never typed: ``make results`` reruns the experiments into the records, then this.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lightning_lora.core.safe_io import atomic_file
from lightning_lora.demo.mnist_datamodule import replay_count
from lightning_lora.experiments.pipeline import RESULTS, duration, shown_value
from lightning_lora.experiments.readme_gpu import gpu, gpu_details
from lightning_lora.experiments.readme_timings import mixed_batch, startup, validation_cost

README = Path("README.md")
BLOCK = re.compile(r"(<!-- results:([\w-]+) -->\n)(.*?)(<!-- /results:\2 -->)", re.DOTALL)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _fewer(before: int, after: int) -> str:
    """``85% fewer`` (or more), against the base's count."""
    if before == 0:
        return "base: none"
    change = 1 - after / before
    return f"{change:.0%} fewer" if change >= 0 else f"{-change:.0%} more"


def _with_stages(lines: list[str], record: dict[str, Any]) -> str:
    """A pipeline's block: its result lines, then each command with its wall time, then the total."""
    stages = [f"| `{s['command']}` | {duration(s['seconds'])} |" for s in record["stages"]]
    total = f"Total: {duration(record['total_seconds'])}."
    return "\n".join([*lines, "", "| stage | wall time |", "|---|---|", *stages, "", total])


def environment(records: dict[str, dict[str, Any]]) -> str:
    env = records["demo"]["environment"]
    tests = records.get("test-suite")
    suite = f" The test suite (`make test`) took {duration(tests['total_seconds'])}." if tests else ""
    return (
        f"Measured on {env['cpu']} ({env['cores']} cores{', ' + env['gpu'] if env['gpu'] else ', CPU only'}), "
        f"Python {env['python']}, torch {env['torch']}, Lightning {env['lightning']}, seed 42, on {env['date']}."
        f"{suite} Wall times include each command's start-up."
    )


def demo(record: dict[str, Any]) -> str:
    s = record["summary"]
    trained = s["trained_digits"]
    (digit,) = trained
    rows = [("pretrained base", "base"), ("adapter on", "adapter_on"), ("adapter off (same run)", "adapter_off"),
            ("merged", "merged")]  # fmt: skip
    lines = [
        "| model | test accuracy | other digits | " + " | ".join(f"wrong {d}" for d in range(10)) + " |",
        "|---|---|---|" + "---|" * 10,
    ]
    for title, key in rows:
        wrong = " | ".join(f"**{w}**" if d == digit else str(w) for d, w in enumerate(s[key]["wrong_per_digit"]))
        lines.append(f"| {title} | {_pct(s[key]['accuracy'])} | {_pct(s[key]['retain_accuracy'])} | {wrong} |")
    before, after = s["base"]["wrong_per_digit"], s["adapter_on"]["wrong_per_digit"]
    others = [d for d in range(10) if d != digit]
    extra = sum(after[d] - before[d] for d in others)
    worst = sorted(others, key=lambda d: after[d] - before[d], reverse=True)[:2]
    weakest = max(range(10), key=lambda d: before[d])
    p = s["parameters"]
    lines += [
        "",
        f"- Digit {digit}'s mistakes go from {before[digit]} to {after[digit]} "
        f"({_fewer(before[digit], after[digit])}). The other digits pay: {extra:+d} mistakes "
        f"in total, most on {worst[0]} ({before[worst[0]]} -> {after[worst[0]]}) and {worst[1]} "
        f"({before[worst[1]]} -> {after[worst[1]]}); overall accuracy {_pct(s['base']['accuracy'])} -> "
        f"{_pct(s['adapter_on']['accuracy'])}. That cost, and how to avoid it, is experiment 4.",
        "- With the adapter off, all "
        + f"{s['test_samples']:,} outputs are "
        + ("the pretrained model's, bit for bit." if s["adapter_off_identical_to_base"] else "NOT the base's.")
        + f" Merged: {'the same predictions' if s['merged_predictions_equal_unmerged'] else 'other predictions'}"
        f" (largest logit difference {s['merged_max_abs_logit_difference']:.1e}).",
        f"- Adapter: {p['trainable']:,} trainable parameters ({p['trainable_percent']:.2f}%); its folder is "
        f"{s['adapter_bytes'] / 1000:.1f} KB and the run's adapter-only checkpoint "
        f"{s['checkpoint_bytes'] / 1000:.1f} KB "
        f"({s['checkpoint_bytes'] / s['model_bytes']:.2%} of the {s['model_bytes'] / 1e6:.1f} MB model).",
        f"- On the test set the base gets digit {weakest} wrong most ({before[weakest]} mistakes); the classic "
        f"set-up fine-tunes on {digit}. `--data.train_digits weakest` decides on the validation split instead "
        "(never the test set), so it may pick another digit; the run prints its choice.",
    ]
    return _with_stages(lines, record)


def demo_mlp(record: dict[str, Any]) -> str:
    s = record["summary"]
    lines = [
        "| model | test accuracy |",
        "|---|---|",
        f"| pretrained base | {_pct(s['base']['accuracy'])} |",
        f"| adapter on | {_pct(s['adapter_on']['accuracy'])} |",
        f"| merged in memory (`merge_and_unload`) | {_pct(s['merged']['accuracy'])}, "
        f"{'same predictions' if s['merged_predictions_equal_unmerged'] else 'other predictions'} "
        f"(largest logit difference {s['merged_max_abs_logit_difference']:.1e}) |",
    ]
    if "merged_file" in s:
        same = "same predictions" if s["merged_file_predictions_equal_unmerged"] else "other predictions"
        lines.append(
            f"| merged file (`lightning-lora merge`, loaded with `load_merged`, given uint8 images) | "
            f"{_pct(s['merged_file']['accuracy'])}, {same} |"
        )
    p = s["parameters"]
    lines += ["", f"Adapter: {p['trainable']:,} trainable parameters ({p['trainable_percent']:.2f}%)."]
    return _with_stages(lines, record)


def demo_shift(record: dict[str, Any]) -> str:
    s = record["summary"]
    lines = [
        "| | value |",
        "|---|---|",
        f"| learned delta, mean (target {s['shift']:g}) | {s['delta_mean']:.6f} |",
        f"| learned delta, std | {s['delta_std']:.1e} |",
        f"| learned delta, max abs deviation from {s['shift']:g} | {s['delta_max_abs_deviation']:.1e} |",
        f"| MSE of the base on the new data | {s['mse_base_on_new_data']:.4g} |",
        f"| MSE with the adapter | {s['mse_finetuned']:.1e} |",
        f"| MSE of the merged plain model (no adapter left) | {s['mse_merged_plain_model']:.1e} |",
    ]
    return _with_stages(lines, record)


def demo_forgetting(record: dict[str, Any]) -> str:
    base, digit = record["base"], record["digit"]
    lines = [
        f"| setting | digit {digit} mistakes | overall accuracy | other digits | fit time |",
        "|---|---|---|---|---|",
        f"| base (no fine-tuning) | {base['target_wrong']} | {_pct(base['accuracy'])} | "
        f"{_pct(base['retain_accuracy'])} | - |",
    ]
    for row in record["settings"]:
        lines.append(
            f"| {row['label']} | {row['target_wrong']} ({_fewer(base['target_wrong'], row['target_wrong'])}) "
            f"| {_pct(row['accuracy'])} ({100 * (row['accuracy'] - base['accuracy']):+.2f}) | "
            f"{_pct(row['retain_accuracy'])} | {duration(row['seconds'])} |"
        )
    goal = [
        r
        for r in record["settings"]
        if r["target_wrong"] <= 0.2 * base["target_wrong"] and r["accuracy"] >= base["accuracy"] - 0.003
    ]
    closest = max(record["settings"], key=lambda r: (r["accuracy"] - base["accuracy"], -r["target_wrong"]))
    batch = yaml.safe_load(Path("configs/finetune_lora.yaml").read_text())["data"]["init_args"]["batch_size"]
    fractions = sorted({float(r["options"][r["options"].index("--data.replay_fraction") + 1])
                        for r in record["settings"] if "--data.replay_fraction" in r["options"]})  # fmt: skip
    shares = ", ".join(f"{f:g} is {replay_count(f, batch)}" for f in fractions)
    meeting = " and ".join(f"*{r['label']}*" for r in goal)
    verdict = (
        f"The goal (at least 80% fewer mistakes on {digit}, overall accuracy within 0.3 points of the base) is met "
        f"by {meeting}."
        if goal
        else f"No setting meets the goal (at least 80% fewer mistakes on {digit}, overall accuracy within 0.3 points "
        f"of the base); the closest on accuracy is {closest['label']}."
    )
    return "\n".join(
        [
            *lines,
            "",
            f"Replay shares are of the config's batch of {batch}, rounded to whole samples: {shares} "
            f"of every {batch} (`data.replay_count`; the run prints its share).",
            "",
            verdict,
            "",
            f"![trade-off](benchmarks/results/{Path(record['figure']).name})",
            "",
            f"Total: {duration(record['total_seconds'])}.",
        ]
    )


def demo_rank_sweep(record: dict[str, Any]) -> str:
    base = record["base"]
    lines = [
        "| fine-tuning | trainable parameters | learning rate | rotated test (learned) | upright test (kept) | "
        "fit time |",
        "|---|---|---|---|---|---|",
        f"| none (the base) | - | - | {_pct(base['rotated_accuracy'])} | {_pct(base['upright_accuracy'])} | - |",
    ]
    for row in record["settings"]:
        name = "full fine-tuning" if row["label"] == "full" else f"LoRA {row['label']}"
        lines.append(
            f"| {name} | {row['trainable']:,} | {row['lr']:g} | {_pct(row['rotated_accuracy'])} | "
            f"{_pct(row['upright_accuracy'])} | {duration(row['seconds'])} |"
        )
    return "\n".join(
        [
            *lines,
            "",
            f"{record['steps']} steps of batch {record['batch_size']} each, digits rotated by {record['rotation']:g} "
            "degrees; each learning rate is the best of those tried on the rotated validation split, the grid "
            "widened until a worse rate lies on each side of it"
            + _rates_at_the_edge(record)
            + " (every rate's scores are in `benchmarks/results/demo-rank-sweep.json`).",
            "",
            _against_the_paper(record),
            "",
            f"![learning vs forgetting](benchmarks/results/{Path(record['figure']).name})",
            "",
            f"Total: {duration(record['total_seconds'])}.",
        ]
    )


def demo_seeds(record: dict[str, Any]) -> str:
    """The demo's headline numbers over several seeds: each seed's value, the mean and the range."""
    seeds = record["seeds"]
    lines = [
        "| headline | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean | range |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for name, stats in record["headlines"].items():
        values = [shown_value(name, row[name]) for row in record["per_seed"]]
        low, high = shown_value(name, stats["min"]), shown_value(name, stats["max"])
        lines.append(f"| {name} | {' | '.join(values)} | {shown_value(name, stats['mean'])} | {low} to {high} |")
    env = record["environment"]
    return "\n".join(
        [
            *lines,
            "",
            f"Each seed is the training seed and the data seed (`--seed_everything S --data.seed S`), the whole demo "
            f"run again (`make demo-seeds`, {duration(record['total_seconds'])}) on {env['cpu']}, "
            f"torch {env['torch']}.",
        ]
    )


def _rates_at_the_edge(record: dict[str, Any]) -> str:
    edge = [row["label"] for row in record["settings"] if not row.get("best_inside_grid", False)]
    return f"; still at the edge after widening: {', '.join(edge)}" if edge else ""


def _against_the_paper(record: dict[str, Any]) -> str:
    """What the sweep shows, said from its numbers, beside Biderman et al.'s two findings."""
    full = next(r for r in record["settings"] if r["label"] == "full")
    lora = [r for r in record["settings"] if r["label"] != "full"]
    learned = [r["rotated_accuracy"] for r in lora]
    less = [r["label"] for r in lora if r["rotated_accuracy"] < full["rotated_accuracy"]]
    kept = [r["label"] for r in lora if r["upright_accuracy"] > full["upright_accuracy"]]
    first = (
        f"Learning: every LoRA rank learns less than full fine-tuning ({_pct(min(learned))} to {_pct(max(learned))} "
        f"on rotated digits against {_pct(full['rotated_accuracy'])})"
        if len(less) == len(lora)
        else f"Learning: LoRA learns less than full fine-tuning at {', '.join(less) or 'no rank'} "
        f"({_pct(full['rotated_accuracy'])} for full)"
    )
    trend = "and more as the rank grows" if learned == sorted(learned) else "mostly more as the rank grows"
    second = (
        f"forgetting: LoRA keeps more of the upright digits than full fine-tuning "
        f"({_pct(full['upright_accuracy'])}) at {', '.join(kept)}"
        if kept
        else "forgetting: no rank keeps more of the upright digits than full fine-tuning "
        f"({_pct(full['upright_accuracy'])})"
    )
    both = len(less) == len(lora) and len(kept) == len(lora)
    agree = "both of its findings" if both else "its findings in part"
    return (
        f"{first}, {trend}; {second}. Biderman et al. found that LoRA learns less and forgets less than full "
        f"fine-tuning on LLMs; this small MNIST run reproduces {agree}."
    )


def demo_two_adapters(record: dict[str, Any]) -> str:
    digits = record["digits"]
    shown = sorted(digits.values(), reverse=True)
    header = " | ".join(f"{d}s wrong" for d in shown)
    lines = [f"| model | {header} | other digits | overall accuracy |", "|---|" + "---|" * (len(shown) + 2)]
    for counts in record["rows"]:
        wrong = " | ".join(str(counts["wrong_per_digit"][d]) for d in shown)
        lines.append(
            f"| {counts['label']} | {wrong} | {_pct(counts['retain_accuracy'])} | {_pct(counts['accuracy'])} |"
        )
    seconds = sum(stage["seconds"] for stage in record["stages"])
    return "\n".join(
        [
            *lines,
            "",
            f"The test split ({record['test_samples']:,} images); the two fine-tunes took {duration(seconds)} "
            "together (`make demo-two-adapters`). In the mixed batch every image's logits are those of its own "
            + (
                "adapter run alone, exactly."
                if record["per_sample_max_difference"] == 0
                else f"adapter run alone to within {record['per_sample_max_difference']:.1e}."
            ),
        ]
    )


# A block shows its record through the renderer of its own name (several views of one record).
RECORD_OF = {"gpu-details": "gpu"}
RESULT_FILES = (README, Path("benchmarks/RESULTS.md"))

RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "gpu": gpu,
    "gpu-details": gpu_details,
    "startup": startup,
    "validation-cost": validation_cost,
    "mixed-batch": mixed_batch,
    "demo": demo,
    "demo-mlp": demo_mlp,
    "demo-shift": demo_shift,
    "demo-forgetting": demo_forgetting,
    "demo-rank-sweep": demo_rank_sweep,
    "demo-two-adapters": demo_two_adapters,
    "demo-seeds": demo_seeds,
}


def load_records(results: Path = RESULTS) -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(results.glob("*.json"))}


def render(readme: str, records: dict[str, dict[str, Any]]) -> str:
    """``readme`` with every results block regenerated from ``records``.

    Raises:
        KeyError: a block names a record that does not exist (run its experiment first).
    """

    def block(match: re.Match) -> str:
        name = match.group(2)
        record = RECORD_OF.get(name, name)
        if name == "environment":
            body = environment(records)
        elif record not in records:
            raise KeyError(f"the results:{name} block has no record {RESULTS / (record + '.json')} (`make results`)")
        else:
            body = RENDERERS[name](records[record])
        return f"{match.group(1)}{body}\n{match.group(4)}"

    return BLOCK.sub(block, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_lora.experiments.readme", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report whether the README is up to date")
    opts = parser.parse_args(argv)
    records, stale = load_records(), []
    for path in RESULT_FILES:
        current = path.read_text()
        fresh = render(current, records)
        if fresh == current:
            continue
        stale.append(str(path))
        if not opts.check:
            with atomic_file(path) as tmp:
                tmp.write_text(fresh)
    if opts.check:
        print(f"{', '.join(stale)}: results differ from the records" if stale else "results are up to date")
        return 1 if stale else 0
    print(f"results regenerated from {RESULTS} in", ", ".join(str(p) for p in RESULT_FILES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
