"""Ship a distilled student as a small fp16 LoRA and write its model card from the mini Table 1.

    python -m opd.results.student_card --runs runs/mini --table runs/mini/table --row mopd \
        --run mopd_sum_seed0 --dest models/mini_student [--grids docs/results/mini_table1/grids]

``--run`` is the training run shipped (one seed of the table row ``--row``): its adapter goes to
``<dest>/pytorch_lora_weights.safetensors`` in fp16 (:mod:`opd.results.ship_adapter`, with the
velocity gap to the fp32 weights), and ``<dest>/README.md`` says how it was made (the run's command,
its compute from its log, the device of the table's runs.json), its test scores
(``<runs>/<run>/eval/results.json``) against the base and its teachers (the table's rows), the share of
each teacher's gain it keeps with its interval (:mod:`opd.results.gain_share`, from the evaluations'
samples; ``--dense-base``: from the evaluations with more images a prompt), and, when the row has
several seeds, the row's means over them. ``<dest>/shipped.json`` keeps how the weights were made, so
the card can be written again from a records folder that holds no adapter (:func:`shipped`).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from opd.evaluation.report import COVER
from opd.models.lora import resolve_lora_file
from opd.results.gain_share import format_share, images_note, row_shares
from opd.results.logs import chained_log, run_command
from opd.results.metrics import averages, columns, evaluated_rows, guidance_scales, own_metrics, with_interval
from opd.results.ship_adapter import PROMPTS, to_fp16, velocity_gaps
from opd.results.table1 import COMPUTE, NORM_GAIN, last_logged
from opd.results.teacher_cards import controls_table


def card(run: str, command: str, compute: Mapping[str, float], minutes: float, device: str, gaps: Mapping[str, float],
         dest: Path, cfg: float, base: Mapping[str, float], base_cfg: float, teachers: Mapping[str, Mapping[str, float]],
         mine: Mapping[str, float], shares: Mapping[str, float], row: Mapping[str, float], cols: Mapping[str, str],
         own: Mapping[str, str], grids: str = "", reproduce: str = "", title: str = "mini MOPD student",
         cover: Mapping[str, float] | None = None) -> str:
    """The student's model card (markdown). ``cfg``: the CFG scale it is sampled (and was evaluated) at;
    ``teachers``: task → the teacher's test row; ``mine``: this run's test row; ``shares``: its
    ``gain_share/<task>`` keys; ``row``: the table row (means over its seeds, ``num_seeds``);
    ``reproduce``: the command that wrote the card; ``cover``: the cover image's test scores (with
    ``mine``'s swapped-prompt scores and prompt sensitivity: the prompt-blind controls)."""
    task_of = {m: t for t, m in own.items()}
    lines = []
    for metric_title, m in cols.items():
        task = task_of.get(m)
        teacher = with_interval(teachers[task], m) if task in teachers else "–"
        lines.append(f"| {metric_title} | {with_interval(base, m)} | {teacher} | {with_interval(mine, m)} | "
                     f"{format_share(shares, task, ' %') + images_note(shares, task) if task else '–'} |")
    seeds = int(row.get("num_seeds", 1))
    over_seeds = ""
    if seeds > 1:
        cells = " | ".join(with_interval(row, m) for m in cols.values())
        over_seeds = (f"\n## The table row over its {seeds} training seeds\n\nMeans with 95 % t-intervals over the "
                      f"seeds (the same recipe, seeds differ):\n\n| {' | '.join(cols)} | avg. share of the teachers' "
                      f"gains |\n|{'---|' * (len(cols) + 1)}\n| {cells} | {with_interval(row, NORM_GAIN)} |\n\n"
                      "Shares of each teacher's gain by the seeds' mean: "
                      + ", ".join(f"{t} {format_share(row, t, ' %')}" for t in own) + ".\n")
    compute_text = ", ".join(f"{compute[k]:,.0f} {label}" for k, label in
                             (("rounds", "rounds"), ("images_sampled", "sampled images"), ("model_tflop", "model TFLOP"))
                             if k in compute)
    return f"""# {title}

A LoRA on `models/mini_base`, distilled by DiffusionOPD from the teachers of
{', '.join(f'`{t}`' for t in teachers)} along its own rollouts. Sample it at **CFG {cfg:g}**.

- **Made by** (run `{run}`):
  `{command}`
- **Device**: {device or 'not recorded'}; **training**: {compute_text}, {minutes:.1f} min wall-clock.
- **Weights**: the EMA of the LoRA weights, diffusers format, shipped in fp16 (`{dest}`): the largest velocity
  difference from the fp32 weights is {gaps['fp16_vs_fp32']:.1e}, against {gaps['adapter_vs_base']:.2f} between
  this student and the base ({len(PROMPTS)} inputs).
- **Use**: `python -m opd.evaluate '+checkpoints.student={{adapter:{dest},guidance_scale:{cfg:g}}}'`.
{f'- **This card and the fp16 weights**: `{reproduce}`' + chr(10) if reproduce else ''}
## Test scores (`python -m opd.evaluate`: all test prompts)

In brackets: 95 % intervals (bootstrap over prompts). The share of a teacher's gain kept is
(student − base) / (teacher − base) on the teacher's own metric; its interval resamples the test
prompts once for base, teacher and student (`opd.results.gain_share`), from the evaluations whose images a
prompt it names: where those are the denser ones of `make mini-table1-dense`, the share is not the ratio
of the scores beside it.{f' Its images: `{grids}`.' if grids else ''}

| metric | base (CFG {base_cfg:g}) | teacher of the task | this student (CFG {cfg:g}) | share of the teacher's gain kept |
|---|---|---|---|---|
{chr(10).join(lines)}
{controls_table(mine, cover or {}, cols)}{over_seeds}"""


#: beside the shipped weights: how they were made (what the card says about the run, kept for later cards)
SHIPPED = "shipped.json"


def shipped(run: Path, dest: Path, model: Path, device: str) -> dict:
    """Ship ``run``'s adapter to ``dest`` in fp16 and return (and write to ``dest/shipped.json``) how it
    was made: the run's command, compute and minutes from its log, the device, the velocity gaps. A run
    whose folder no longer holds its adapter (a records folder, :mod:`opd.results.records`) leaves the
    weights already at ``dest`` as they are and returns their ``shipped.json``."""
    record = Path(dest) / SHIPPED
    if not (Path(run) / "adapter").is_dir():
        if not record.is_file():
            raise SystemExit(f"{run}/adapter: no adapter to ship, and no {record} of weights shipped from it earlier")
        return json.loads(record.read_text())
    Path(dest).mkdir(parents=True, exist_ok=True)
    log, minutes = chained_log(Path(run).parent, [Path(run).name])
    source = resolve_lora_file(Path(run) / "adapter")
    made = {"run": Path(run).name, "command": run_command(run), "minutes": minutes, "device": device,
            "compute": {k: v for k, key in COMPUTE.items() if (v := last_logged(log, key)) is not None},
            "gaps": velocity_gaps(model, source, to_fp16(source, dest))}
    record.write_text(json.dumps(made, indent=1))
    return made


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="the folder of make mini-table1's runs")
    parser.add_argument("--table", type=Path, required=True, help="the table's folder (results.json, runs.json)")
    parser.add_argument("--row", default="mopd", help="the table row the run is a seed of")
    parser.add_argument("--run", required=True, help="the run to ship, e.g. mopd_sum_seed0")
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--base", type=Path, default=Path("docs/results/mini_base/results.json"))
    parser.add_argument("--model", type=Path, default=Path("models/mini_base"), help="the base model (velocity gap)")
    parser.add_argument("--grids", default="", help="where the run's test grids are committed, for the card")
    parser.add_argument("--dense-base", type=Path, default=None,
                        help="the base's evaluation with more images a prompt: the shares use <run>/dense where "
                             "base, teacher and student all have the task (as table1's --dense-base)")
    parser.add_argument("--title", default="mini MOPD student")
    parser.add_argument("--suite", default="mini")
    args = parser.parse_args(argv)
    results = json.loads((args.table / "results.json").read_text())
    record = json.loads((args.table / "runs.json").read_text()).get(args.row, {})
    if args.row not in results:
        raise SystemExit(f"{args.table / 'results.json'} has no row {args.row!r}; rows: {sorted(results)}")
    own, cols = own_metrics(args.suite), columns(args.suite)
    evaluation = args.runs / args.run / "eval" / "results.json"
    mine, cfg = evaluated_rows(evaluation)[args.run], guidance_scales(evaluation).get(args.run, 1.0)
    # the cover image is searched per evaluation, for the tasks and judges only: the base's stands in where a
    # record of the run's evaluation kept no cover row
    cover = json.loads(evaluation.read_text()).get(COVER) or json.loads(args.base.read_text()).get(COVER, {})
    teachers = {t: results[f"teacher_{t}"] for t in own if f"teacher_{t}" in results}
    bases = {**({"dense": args.dense_base} if args.dense_base else {}), "eval": args.base.parent}
    shares = row_shares(args.runs, bases, {args.run: {"seeds": [args.run]}},
                        {args.run: list(teachers)}, own, averages(args.suite)).get(args.run, {})
    made = shipped(args.runs / args.run, args.dest, args.model, record.get("device", ""))
    base_cfg = guidance_scales(args.base).get("base", 4.5)
    reproduce = (f"python -m opd.results.student_card --runs {args.runs} --table {args.table} --row {args.row} "
                 f"--run {args.run} --dest {args.dest}" + (f" --grids {args.grids}" if args.grids else "")
                 + (f" --dense-base {args.dense_base}" if args.dense_base else ""))
    text = card(args.run, made["command"], made["compute"], made["minutes"], made["device"], made["gaps"],
                args.dest, cfg, evaluated_rows(args.base)["base"], base_cfg, teachers, mine, shares, results[args.row],
                cols, own, args.grids, reproduce, args.title, cover)
    (args.dest / "README.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
