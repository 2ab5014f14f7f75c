"""Pick each skill's teacher among trained candidates by its own test metric and install it.

    python scripts/pick_teachers.py --root runs/table1 --dest models/mini_teachers \
        ocr=ocr_lr1e3,ocr_lr2e3 geneval=gen_grpo_lr1e3,gen_nft_lr3e4 aesthetic=aes_lr1e3

Each candidate is a run folder ``<root>/<name>`` holding ``adapter/`` and ``val/results.json``
(``python -m opd.evaluate`` of that adapter under the checkpoint name ``<name>`` on *training*
prompts: candidates are never compared on the test sets). The winner's
adapter is copied to ``<dest>/<skill>/`` and ``<root>/picked.json`` records every candidate's
scores, the winner and the guidance scale it was evaluated with (a distillation teacher uses it).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

#: skill → the metric of its own task in results.json
METRIC = {"ocr": "ocr/ocr_exact", "geneval": "geneval/geneval_mini_correct", "aesthetic": "aesthetic/aesthetic_mini"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--teacher-configs", type=Path, default=None,
                        help="conf/teacher: set guidance_scale in mini_<skill>.yaml to the winner's")
    parser.add_argument("choices", nargs="+", metavar="SKILL=RUN[,RUN...]")
    args = parser.parse_args()
    record = args.root / "picked.json"  # a later pick (of other skills) keeps the earlier ones
    picked = json.loads(record.read_text()) if record.exists() else {}
    for choice in args.choices:
        skill, _, names = choice.partition("=")
        scores = {}
        for name in names.split(","):
            results = args.root / name / "val" / "results.json"
            if not results.exists() or not (args.root / name / "adapter").exists():
                print(f"[pick] {skill}: candidate {name} has no adapter or eval results; skipped")
                continue
            row = json.loads(results.read_text())[name]
            hydra_cfg = args.root / name / "val" / ".hydra" / "config.yaml"
            config = yaml.safe_load(hydra_cfg.read_text()) if hydra_cfg.exists() else {}
            scores[name] = {"score": row[METRIC[skill]], "guidance_scale": config.get("guidance_scale"), **row}
        if not scores:
            raise SystemExit(f"[pick] {skill}: no usable candidate among {names}")
        best = max(scores, key=lambda n: scores[n]["score"])
        target = args.dest / skill
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(args.root / best / "adapter", target)
        guidance = scores[best]["guidance_scale"]
        config = args.teacher_configs / f"mini_{skill}.yaml" if args.teacher_configs else None
        if config is not None and config.exists() and isinstance(guidance, (int, float)):
            lines = [f"guidance_scale: {float(guidance)}" if line.startswith("guidance_scale:") else line
                     for line in config.read_text().splitlines()]
            config.write_text("\n".join(lines) + "\n")
        picked[skill] = {"winner": best, "metric": METRIC[skill], "candidates": scores}
        print(f"[pick] {skill}: {best} ({METRIC[skill]} = {scores[best]['score']:.3f}) → {target}; "
              + ", ".join(f"{n} {s['score']:.3f}" for n, s in scores.items()))
    record.write_text(json.dumps(picked, indent=1))


if __name__ == "__main__":
    main()
