"""Ablations of the method on demo data, each trained and evaluated through the bundle configs (demo profiles).

Variants of cond_ddpm (all with the same data, seed and training budget):

* ``full``:            conditioning encoder started from the contrastive encoder pretrained on the same data
* ``random_encoder``:  conditioning encoder randomly initialised (no ``--encoder_ckpt``)
* ``unconditioned``:   plain DDPM (``--conditioning false``)
* ``gaussian``:        the full model with Gaussian instead of simplex noise (``--noise_type gaussian``)

plus the intensity baseline (``score.yaml --baseline true``). Every variant is evaluated with cond_ddpm's
``evaluate.yaml`` (maps) and ``score.yaml`` (threshold found on each data set's val split, scored on its test
split) and on the
NOVA-like images with nova_eval's ``inference.yaml`` + ``evaluate.yaml``; one table is printed at the end and
written to ``WORKDIR/ablation.json`` and ``WORKDIR/ablation.md``.

    python benchmarks/ablation.py --workdir DIR [--epochs N] [--batch_size N --slices_per_volume N]
        [--lr_schedule constant|cosine] [--encoder_epochs N] [--size default|tiny] [--data_root DEMO_DATA_DIR]
        [--variants full,gaussian] [--seeds 0,1,2] [--force]

``--epochs``, ``--batch_size``, ``--slices_per_volume`` and ``--lr_schedule`` change cond_ddpm's training for every
variant (a batch is ``batch_size // slices_per_volume`` volumes, each giving ``slices_per_volume`` slices).

The stages, their sizes and the command runner are the one-command demo's (``custom_components.demo``);
logs go to ``WORKDIR/logs/<stage>.log``. Finished stages are skipped when run again with the same
commands (``--force`` reruns everything). Takes several times the demo's duration: not for CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_components.demo import (  # noqa: E402
    PROFILES,
    TRAIN_CONFIGS,
    DemoError,
    Stage,
    _clear,
    _display,
    _read_json,
    bundle_command,
    over_seeds as over_seeds_of,
    run_stage,
    summarize_results,
)
from custom_components.engines import LR_SCHEDULES  # noqa: E402
from custom_components.utils import write_json_atomic, write_text_atomic  # noqa: E402

VARIANTS = {
    "full": {"pretrained_encoder": True, "ids": {}},
    "random_encoder": {"pretrained_encoder": False, "ids": {}},
    "unconditioned": {"pretrained_encoder": False, "ids": {"conditioning": False}},
    "gaussian": {"pretrained_encoder": True, "ids": {"noise_type": "gaussian"}},
}
DESCRIPTIONS = {
    "full": "pretrained contrastive encoder + conditional DDPM, simplex noise",
    "random_encoder": "conditioning encoder randomly initialised",
    "unconditioned": "unconditioned DDPM",
    "gaussian": "full model, Gaussian noise",
    "baseline": "intensity baseline (no model)",
}
STATE_FILE = "ablation_state.json"


@dataclass
class Job:
    """A demo stage plus the stages whose outputs it reads (it reruns when one of them ran)."""

    stage: Stage
    depends: list[str] = field(default_factory=list)


def plan(workdir: Path, size: str, seed: int, budget: dict, encoder_epochs: int | None,
         data_root: Path | None, variants: list[str], cache: Path | None = None) -> list[Job]:
    """The ablation's stages: data (unless given), encoder, and per variant train / evaluate / NOVA boxes / metrics.
    ``budget``: cond_ddpm training ids over the profile's (epochs, batch_size, slices_per_volume);
    ``cache``: the preprocessed-volume cache (default ``workdir/cache``), shared by seeds that share the data."""
    profile = PROFILES[size]
    data = data_root or workdir / "data"
    cache = cache or workdir / "cache"
    common = {"dataset_dir": data, "cache_dir": cache, "seed": seed}
    network = profile["network"]
    jobs: list[Job] = []
    if data_root is None:
        data_args = [f"--{k}={v}" for k, v in profile["data"].items()]
        jobs.append(Job(Stage("data", [sys.executable, "-m", "custom_components", "demo_data", "--out", str(data),
                                       f"--seed={seed}", *data_args],
                              outputs=[data / "demo_data.json"], folder=data, description="demo data")))
    data_deps = ["data"] if data_root is None else []

    encoder = workdir / "encoder" / "model.pt"
    if any(VARIANTS[v]["pretrained_encoder"] for v in variants):
        enc = {**profile["encoder"], **({"epochs": encoder_epochs} if encoder_epochs else {})}
        jobs.append(Job(Stage("encoder", bundle_command("contrastive_encoder", TRAIN_CONFIGS["demo"], {
            **common, "output_dir": workdir / "encoder", **enc}),
            outputs=[encoder], folder=workdir / "encoder", description="contrastive encoder pretraining"),
            depends=data_deps))

    train = {**profile["cond_ddpm"], **budget}  # demo.yaml validates at the last epoch, whatever the budget
    for variant in variants:
        spec = VARIANTS[variant]
        v = workdir / variant
        ids = {**network, **spec["ids"]}
        ckpt = v / "cond_ddpm" / "model.pt"
        train_ids = {**common, "output_dir": v / "cond_ddpm", **ids, **train}
        if spec["pretrained_encoder"]:
            train_ids["encoder_ckpt"] = encoder
        maps, eval_dir, nova = v / "eval" / "maps", v / "eval" / "model", v / "nova"
        jobs += [
            Job(Stage(f"{variant}_train", bundle_command("cond_ddpm", TRAIN_CONFIGS["demo"], train_ids),
                      outputs=[ckpt], folder=v / "cond_ddpm",
                      description=f"cond_ddpm training: {DESCRIPTIONS[variant]}"),
                depends=data_deps + (["encoder"] if spec["pretrained_encoder"] else [])),
            Job(Stage(f"{variant}_maps", bundle_command("cond_ddpm", ["common.yaml", "evaluate.yaml", "demo.yaml"], {
                **common, "output_dir": maps, "ckpt_path": ckpt, **ids, **profile["evaluate"]}),
                outputs=[maps / "maps.json"], folder=maps, description=f"evaluation maps: {variant}"),
                depends=[f"{variant}_train"]),
            Job(Stage(f"{variant}_score", bundle_command("cond_ddpm", ["score.yaml"], {
                "maps_dir": maps, "output_dir": eval_dir, **profile["score"]}),
                outputs=[eval_dir / "metrics.json"], folder=eval_dir, description=f"evaluation scores: {variant}"),
                depends=[f"{variant}_maps"]),
            Job(Stage(f"{variant}_nova_predict", bundle_command("nova_eval", ["common.yaml", "inference.yaml", "demo.yaml"], {
                "dataset_dir": data, "ckpt_path": ckpt, "output_dir": nova,
                "predictions_file": nova / "predictions.json", "seed": seed, **ids, **profile["nova"]}),
                outputs=[nova / "predictions.json"], folder=nova, description=f"NOVA boxes: {variant}"),
                depends=[f"{variant}_train"]),
            Job(Stage(f"{variant}_nova_metrics", bundle_command("nova_eval", ["evaluate.yaml"], {
                "dataset_dir": data, "output_dir": nova, "predictions_file": nova / "predictions.json",
                "metadata_file": data / "NOVA" / "metadata.csv", "output_file": nova / "metrics.json"}),
                outputs=[nova / "metrics.json"], folder=nova / "metrics.json", description=f"NOVA metrics: {variant}"),
                depends=[f"{variant}_nova_predict"]),
        ]
    # the intensity baseline scores the images of the first variant's maps: no network involved
    base, maps = workdir / "baseline" / "eval" / "baseline", workdir / variants[0] / "eval" / "maps"
    jobs.append(Job(Stage("baseline_score", bundle_command("cond_ddpm", ["score.yaml"], {
        "maps_dir": maps, "output_dir": base, "baseline": True, **profile["score"]}),
        outputs=[base / "metrics.json"], folder=base, description="intensity baseline scores"),
        depends=[f"{variants[0]}_maps"]))
    return jobs


def run(jobs: list[Job], workdir: Path, force: bool, verbose: bool) -> dict:
    """Run the jobs in order; a job is skipped when it finished earlier with the same command, its outputs
    exist and none of the jobs it depends on ran now; a job that runs starts from an empty output folder.
    Returns the seconds per job."""
    state = (None if force else _read_json(workdir / STATE_FILE)) or {}
    ran: set[str] = set()
    for job in jobs:
        stage, command = job.stage, _display(job.stage.command)
        record = state.get(stage.name) or {}
        done = (record.get("command") == command and record.get("finished")
                and all(p.exists() for p in stage.outputs) and not ran.intersection(job.depends))
        if done:
            print(f"[{stage.name}] done earlier ({record.get('seconds', 0):.0f} s), skipped", flush=True)
            continue
        _clear(stage.folder)
        if stage.name == "data":
            _clear(workdir / "cache")  # the cache is keyed on file paths, not on their content
        print(f"[{stage.name}] {stage.description}\n  $ {command}", flush=True)
        state[stage.name] = {"finished": False, "command": command}
        _save_state(workdir, state)
        start = time.perf_counter()
        run_stage(stage, workdir / "logs" / f"{stage.name}.log", verbose)
        seconds = time.perf_counter() - start
        state[stage.name] = {"finished": True, "seconds": round(seconds, 1), "command": command}
        _save_state(workdir, state)
        ran.add(stage.name)
        print(f"[{stage.name}] finished in {seconds:.0f} s", flush=True)
    return {name: record.get("seconds") for name, record in state.items()}


def _save_state(workdir: Path, state: dict) -> None:
    write_json_atomic(workdir / STATE_FILE, state)


def collect(workdir: Path, variants: list[str]) -> list[dict]:
    """One row per variant (and the baseline): test-split means of Dice, best Dice and AUPRC per data set, NOVA
    mAP@30."""
    rows = []
    for name in [*variants, "baseline"]:
        summary = summarize_results(workdir / name)
        kind = "baseline" if name == "baseline" else "model"
        row = {"variant": name, "description": DESCRIPTIONS[name]}
        for dataset, entry in summary["datasets"].items():
            if dataset == "IXI":
                continue
            values = entry.get(kind) or {}
            row[f"{dataset} dice"] = values.get("dice")
            row[f"{dataset} best dice"] = values.get("best_dice")  # each volume at its own threshold: the maps' ceiling
            row[f"{dataset} auprc"] = values.get("auprc")
        nova = (summary.get("nova") or {}).get("reference") or {}
        row["NOVA mAP@30"] = nova.get("mAP@30")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (missing values as a dash)."""
    columns = list(dict.fromkeys(k for row in rows for k in row if k != "description"))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c) for c in columns]
        lines.append("| " + " | ".join("–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
                                       for v in cells) + " |")
    return "\n".join(lines)


def over_seeds(rows_by_seed: dict[int, list[dict]]) -> list[dict]:
    """Per variant and column the (mean, population std) over seeds (``demo.over_seeds``; None where no seed has
    a value)."""
    out = []
    for i, row in enumerate(next(iter(rows_by_seed.values()))):
        stats = over_seeds_of({seed: {k: v for k, v in rows[i].items() if k not in ("variant", "description")}
                               for seed, rows in rows_by_seed.items()})
        out.append({"variant": row["variant"], "description": row["description"],
                    **{c: None if v["mean"] is None else (v["mean"], v["std"]) for c, v in stats.items()}})
    return out


def seed_table(rows: list[dict]) -> str:
    """Rows of (mean, std) pairs as a Markdown table: ``mean ± std``."""
    columns = [c for c in rows[0] if c != "description"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row[c] if c == "variant" else "–" if row[c] is None else f"{row[c][0]:.3f} ± {row[c][1]:.3f}"
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="work folder (created; finished stages are reused)")
    parser.add_argument("--epochs", type=int, default=None, help="cond_ddpm training epochs of every variant "
                        "(default: the demo profile's)")
    parser.add_argument("--batch_size", type=int, default=None, help="cond_ddpm slices per optimiser step "
                        "(default: the demo profile's)")
    parser.add_argument("--slices_per_volume", type=int, default=None, help="cond_ddpm slices drawn per training "
                        "volume and epoch (default: the demo profile's)")
    parser.add_argument("--lr_schedule", choices=LR_SCHEDULES, default=None, help="cond_ddpm learning "
                        "rate over training (default: the demo profile's)")
    parser.add_argument("--encoder_epochs", type=int, default=None, help="contrastive encoder epochs "
                        "(default: the demo profile's)")
    parser.add_argument("--size", choices=sorted(PROFILES), default="default", help="demo profile (data and networks)")
    parser.add_argument("--data_root", default=None, help="an existing demo data root (default: generate one)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds; the data stay the same "
                        "(generated with seed 0 unless --data_root); mean ± std over seeds")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument("--verbose", action="store_true", help="show the stages' output on the console")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must list distinct integers, got {args.seeds!r}")
    budget = {k: getattr(args, k) for k in ("epochs", "batch_size", "slices_per_volume")
              if getattr(args, k) is not None}
    if any(v < 1 for v in budget.values()) or args.encoder_epochs is not None and args.encoder_epochs < 1:
        parser.error("--epochs, --batch_size, --slices_per_volume and --encoder_epochs must be at least 1")
    if args.lr_schedule is not None:
        budget["lr_schedule"] = args.lr_schedule
    workdir = Path(args.workdir).expanduser().absolute()
    data_root = Path(args.data_root).expanduser().absolute() if args.data_root else None
    if data_root is not None and not (data_root / "splits").is_dir():
        parser.error(f"--data_root {data_root} has no splits/ folder: not a data root")

    rows_by_seed, seconds = {}, {}
    try:
        if data_root is None:  # one data root for every seed
            data_jobs = [j for j in plan(workdir, args.size, 0, {}, None, None, variants) if j.stage.name == "data"]
            seconds["data"] = run(data_jobs, workdir, args.force, args.verbose)
            data_root = workdir / "data"
        for seed in seeds:
            folder = workdir / f"seed{seed}"
            jobs = plan(folder, args.size, seed, budget, args.encoder_epochs, data_root, variants,
                        cache=workdir / "cache")
            seconds[f"seed{seed}"] = run(jobs, folder, args.force, args.verbose)
            rows_by_seed[seed] = collect(folder, variants)
    except DemoError as err:
        print(f"ablation: {err}", file=sys.stderr)
        return 1
    rows = over_seeds(rows_by_seed)
    text = seed_table(rows)
    settings = {"size": args.size, "seeds": seeds, "cond_ddpm": budget, "encoder_epochs": args.encoder_epochs,
                "profile": PROFILES[args.size], "data_root": str(data_root)}
    write_json_atomic(workdir / "ablation.json", {"settings": settings, "rows": rows,
                                                  "per_seed": {str(k): v for k, v in rows_by_seed.items()},
                                                  "seconds": seconds})
    changed = "".join(f", cond_ddpm {k} {v}" for k, v in budget.items())
    notes = "\n".join(f"- `{r['variant']}`: {r['description']}" for r in rows)
    per_seed = "\n\n".join(f"Seed {seed}:\n\n{table(r)}" for seed, r in rows_by_seed.items())
    write_text_atomic(
        workdir / "ablation.md",
        f"# Ablations ({args.size} demo profile{changed}, seeds {', '.join(map(str, seeds))})\n\n"
        f"Test-split means, mean ± std (population) over the seeds; Dice at the threshold found on each data set's "
        f"val split, best dice with each test volume at its own Dice-optimal threshold; NOVA reference mAP@30 (no NOVA "
        f"run for the intensity baseline).\n\n{text}\n\n{notes}\n\n"
        f"{per_seed}\n")
    print("\n" + text + "\n\n" + notes)
    print(f"\nTable: {workdir / 'ablation.md'}; numbers: {workdir / 'ablation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
