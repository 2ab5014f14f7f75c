"""The Make chains behind the mini tables (``make mini-teachers``, ``make mini-table1``) are committed
commands: their dry runs list every step, and every training and evaluation step composes (no
unknown key, group or experiment) without running anything."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess

import pytest

from conftest import ROOT, compose_cfg
from test_experiments import compose_train

MODULES = {"opd.train": "train", "opd.evaluate": "eval"}


def dry_run(target: str, tmp_path, *variables: str) -> list[str]:
    """The recipe lines ``make -n <target> [VAR=value ...]`` prints for empty run folders (continuations joined)."""
    done = subprocess.run(["make", "-n", target, f"RUNS={tmp_path / 'runs'}", *variables,
                           ], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [line.strip() for line in done.stdout.replace("\\\n", " ").splitlines() if line.strip()]


def overrides_of(line: str) -> tuple[str, list[str]] | None:
    """``(config name, overrides)`` of an ``opd.train``/``opd.evaluate`` line; a multirun's sweeps
    (``a=x,y``) take their first value, Hydra's own settings are left out."""
    words = shlex.split(line)
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1] in MODULES:
            config, args = MODULES[words[i + 1]], words[i + 2:]
            break
    else:
        return None
    out = []
    for arg in args:
        if arg == "-m" or arg.startswith(("hydra.", "hydra/")):
            continue
        key, _, value = arg.partition("=")
        if "," in value and not re.search(r"[{\[]", value):
            arg = f"{key}={value.split(',')[0]}"
        out.append(arg)
    return config, out


#: values that the chains read at run time from earlier steps, replaced by stand-ins so that the rest composes
RUN_TIME = [
    (r"\$\(for [^)]*\)", ""),                                   # one checkpoint per snapshot found
    (r"\$\(cat [^)]*\)", "0.0003"),                              # a setting chosen on val (pick_setting)
    (r"\$\([^)]*opd\.results\.compute[^)]*\)", "1.5"),           # a compute budget read off finished runs
    (r"\$\([^)]*pick_teachers[^)]*--overrides[^)]*\)", ""),      # the picked teachers (else the shipped ones)
    (r"\$\([^)]*pick_teachers[^)]*--checkpoint (\w+)\)", r"+checkpoints.teacher_\1={adapter:t,guidance_scale:1.0}"),
]


def stand_ins(line: str) -> str:
    for pattern, value in RUN_TIME:
        line = re.sub(pattern, value, line)
    return line


@pytest.mark.parametrize("target", ["mini-teachers", "mini-table1", "mini-table1-dense"])
def test_the_mini_table_chains_compose(target, tmp_path):
    lines = [stand_ins(line) for line in dry_run(target, tmp_path)]
    steps = [step for line in lines if "$(" not in line and (step := overrides_of(line)) is not None]
    trains = [o for name, o in steps if name == "train"]
    assert len(trains) >= (3 if target == "mini-teachers" else 30) and len(steps) > len(trains)
    for name, overrides in steps:
        if name == "train":  # each chain evaluates its adapters in folders of their own
            assert compose_train(overrides, tmp_path / "out").eval is None, overrides
        else:
            compose_cfg(name, overrides, tmp_path / "out")
    assert any("opd.results." in line for line in lines)
    if target == "mini-teachers":  # every snapshot of each run scored on its own task's val prompts only
        evals = [o for name, o in steps if name == "eval" and "images_per_prompt=1" in o]
        assert len(evals) == 3 and all(sum(o.startswith("~eval_tasks.") for o in e) == 2 for e in evals)
        # one candidate run per skill, none with the KL term by default
        assert not any("objective.kl_weight=1.0" in o for o in trains) and len(trains) == 3
        snapshots = [a for o in trains for a in o if a.startswith("callbacks.adapter_snapshots.every_n_steps=")]
        assert [a.split("=")[1] for a in snapshots] == ["25", "50", "50"]  # every run snapshots
        picks = [line for line in lines if "opd.results.pick_teachers" in line and "--dest" in line]
        assert len(picks) == 1 and "'geneval=geneval_nft/*'" in picks[0]
        # KL_SKILLS adds a candidate run with the KL term per skill named, competing on val with the plain one
        with_kl = [stand_ins(line) for line in dry_run(target, tmp_path, "KL_SKILLS=geneval aesthetic")]
        kl_steps = [overrides_of(line) for line in with_kl if "$(" not in line]
        kl_trains = [step[1] for step in kl_steps if step is not None and step[0] == "train"]
        assert [o.count("objective.kl_weight=1.0") for o in kl_trains] == [0, 0, 0, 1, 1]
        assert any("'geneval=geneval_nft/*,geneval_nftkl/*'" in line for line in with_kl)
        # KL_RUNS: candidates that carry their own weight in their names, beside KL_SKILLS' one
        sweep = [stand_ins(line) for line in dry_run(target, tmp_path, "KL_SKILLS=geneval",
                                                      "KL_RUNS=geneval_nftkl0.1 aesthetic_nftkl0.01")]
        sweep_trains = [step[1] for line in sweep if "$(" not in line
                        and (step := overrides_of(line)) is not None and step[0] == "train"]
        weights = [[a.split("=")[1] for a in o if a.startswith("objective.kl_weight=")] for o in sweep_trains]
        assert weights == [[], [], [], ["1.0"], ["0.1"], ["0.01"]]
        dirs = [re.search(r"hydra\.run\.dir=\S*/(\w+\.?\w*)", line).group(1) for line in sweep if "-m opd.train" in line]
        assert dirs[3:] == ["geneval_nftkl", "geneval_nftkl0.1", "aesthetic_nftkl0.01"]
        for o in sweep_trains[4:]:
            compose_train(o, tmp_path / "out")
        assert any("'geneval=geneval_nft/*,geneval_nftkl/*,geneval_nftkl0.1/*'" in line for line in sweep)
        assert any("'aesthetic=aesthetic_nft/*,aesthetic_nftkl0.01/*'" in line for line in sweep)
        # CFG_SKILLS: DiffusionNFT from a CFG-distilled start (the base at CFG 4.5 as the teacher of a CFG-free LoRA)
        cfgd = [stand_ins(line) for line in dry_run(target, tmp_path, "CFG_SKILLS=geneval", "CFG_DISTILL_STEPS=60")]
        cfgd_trains = [step[1] for line in cfgd if "$(" not in line
                       and (step := overrides_of(line)) is not None and step[0] == "train"]
        start = [o for o in cfgd_trains if "experiment=mini/sopd_geneval" in o]
        assert len(start) == 1 and {"teacher.geneval.adapter=null", "teacher.geneval.guidance_scale=4.5",
                                    "sampler.guidance_scale=1.0", "module.lora.rank=16", "trainer.max_steps=60"} <= set(start[0])
        rl = [o for o in cfgd_trains if f"module.init_adapter={tmp_path}/runs/geneval_cfgd/adapter" in o]
        assert len(rl) == 1 and "experiment=mini/teacher_geneval" in rl[0]
        assert cfgd_trains.index(start[0]) < cfgd_trains.index(rl[0])  # the start is trained first
        compose_train(start[0], tmp_path / "out")
        assert any("'geneval=geneval_nft/*,geneval_nftcfgd/*'" in line for line in cfgd)
        bad = subprocess.run(["make", "-n", target, f"RUNS={tmp_path / 'runs'}", "KL_RUNS=genval_nftkl0.1"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert bad.returncode != 0 and 'KL_RUNS: "genval_nftkl0.1" is not <skill>_nftkl<weight>' in bad.stderr
    else:
        # the table's row settings reach opd.results.table1 as JSON through the shell's quoting
        table = [shlex.split(line) for line in lines if "opd.results.table1" in line]
        assert len(table) == 1
        for option in ("--stages", "--extra"):
            assert isinstance(json.loads(table[0][table[0].index(option) + 1]), dict), option
        # the multi-reward baselines stop at a compute budget; the students run a fixed number of rounds
        budgets = [o for o in trains if "callbacks.compute_budget.max_model_tflop=1.5" in o]
        assert len(budgets) >= 2 * 3 + 3 + 2  # multi own/total × 3 seeds, cascade, tuning
        dense = [o for name, o in steps if name == "eval" and "images_per_prompt=16" in o]
        if target == "mini-table1-dense":  # base + 2 teachers + 4 MOPD variants × 3 seeds, GenEval and aesthetic, no controls
            assert len(dense) == 15 and all("~eval_tasks.ocr" in o and "controls.cover=null" in o for o in dense)
            assert sorted(sum(o.startswith("~eval_tasks.") for o in e) for e in dense) == [1] * 13 + [2, 2]
            students = sorted(o.split("=")[0] for e in dense for o in e if o.startswith("+checkpoints.mopd_"))
            assert students == sorted(f"+checkpoints.mopd_{v}_seed{n}" for v in ("sum", "sum_mean", "balanced",
                                                                             "balanced_mean") for n in range(3))
            assert "--dense-base" in table[0]
        else:
            assert not dense and "--dense-base" not in table[0]


def test_the_table_from_the_shipped_teachers_and_given_learning_rates(tmp_path):
    """TEACHERS=shipped MOPD_LR=... MULTI_LR=...: no teacher or tuning run, the shipped teachers recorded as
    picked, the learning rates written as given, multi-reward RL at MOPD's own compute and at its total (the
    shipped teachers' training.json counted by compute --picked); every step composes."""
    lines = dry_run("mini-table1", tmp_path, "TEACHERS=shipped", "MOPD_LR=1e-3", "MULTI_LR=3e-4")
    runs = tmp_path / "runs"
    picks = [line for line in lines if "--shipped" in line]
    assert len(picks) == 1 and picks[0].endswith(
        f"-m opd.results.pick_teachers --root {runs} --shipped models/mini_teachers ocr geneval aesthetic")
    assert f"mkdir -p {runs} && echo 1e-3 > {runs}/mopd_lr.txt" in lines
    assert f"mkdir -p {runs} && echo 3e-4 > {runs}/multi_lr.txt" in lines
    steps = [step for line in map(stand_ins, lines) if "$(" not in line and (step := overrides_of(line)) is not None]
    folders = [word for line in lines for word in line.split() if word.startswith("hydra.run.dir=")]
    assert folders and not any("tune_" in f or "_nft" in f for f in folders)
    assert sum("multi_own" in f for f in folders) == sum("multi_total" in f for f in folders) == 6  # 3 seeds, trained, evaluated
    budgets = [line for line in lines if "opd.results.compute" in line]
    assert sum(f"--picked {runs}/picked.json" in line for line in budgets) == 3  # the teachers count in multi_total
    for name, overrides in steps:
        if name == "train":
            compose_train(overrides, tmp_path / "out")
        else:
            compose_cfg(name, overrides, tmp_path / "out")


def test_the_committed_table_is_rebuilt_from_its_records(tmp_path):
    """make mini-table1-records on a copy of docs/results/mini_table1 writes the committed table again, digit
    for digit (the records hold everything the table is made of)."""
    shutil.copytree(ROOT / "docs/results/mini_table1", tmp_path / "t1")
    device = json.loads((ROOT / "docs/results/mini_table1/table/runs.json").read_text())["mopd"]["device"]
    done = subprocess.run(["make", "mini-table1-records", f"RECORDS={tmp_path / 't1'}", f"DEVICE={device}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("results.md", "results.json"):
        assert (tmp_path / "t1/table" / name).read_text() == (ROOT / "docs/results/mini_table1/table" / name).read_text()


def test_judge_workers_reach_every_run_that_scores_with_the_mini_judges(tmp_path):
    """JUDGE_WORKERS=4: multi-reward RL, the cascade stages that use a judge, the GenEval and aesthetic teachers
    and every evaluation give those judges 4 processes; the OCR stage and the OCR teacher do not get a judge
    override (no such reward to override); every step composes."""
    lines = dry_run("mini-table1", tmp_path, "JUDGE_WORKERS=4")
    steps = [step for line in map(stand_ins, lines) if "$(" not in line and (step := overrides_of(line)) is not None]
    judges = {"+reward.geneval_mini.num_workers=4", "+reward.aesthetic_mini.num_workers=4"}
    for name, overrides in steps:
        given = {o for o in overrides if "num_workers=4" in o and ("geneval_mini" in o or "aesthetic_mini" in o)}
        experiment = next((o for o in overrides if o.startswith("experiment=")), "")
        if name == "eval":
            assert given == {"+eval_tasks.geneval.rewards.geneval_mini.num_workers=4",
                             "+eval_tasks.aesthetic.rewards.aesthetic_mini.num_workers=4"}, overrides
        elif experiment == "experiment=mini/multi_reward_nft":
            assert given == judges
        elif experiment in ("experiment=mini/teacher_geneval", "experiment=mini/cascade_geneval"):
            assert given == {"+reward.geneval_mini.num_workers=4"}
        elif experiment in ("experiment=mini/teacher_aesthetic_nft", "experiment=mini/cascade_aesthetic"):
            assert given == {"+reward.aesthetic_mini.num_workers=4"}
        else:  # OCR runs and the students (no reward model)
            assert not given, overrides
    for name, overrides in steps:
        if name == "train":
            compose_train(overrides, tmp_path / "out")
        else:
            compose_cfg(name, overrides, tmp_path / "out")
