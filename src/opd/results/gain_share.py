"""How much of a teacher's gain a student keeps, with a 95 % interval from the evaluations' images.

The share of a teacher's gain that a student keeps, on the teacher's own metric, is

    share = (student − base) / (teacher − base)

(1: level with the teacher; 0: the base). Its three terms are measured on the same test prompts, so
their noise is shared: a prompt that every model finds hard lowers all three. The interval here
resamples the prompts once for all models (:func:`opd.evaluation.bootstrap.resampled_means`, tags
kept for a task averaged by tag) and takes the percentile interval of the share over the resamples.
A student trained with several seeds enters as the mean of its seeds' scores on each resample: the
interval then covers the evaluation's noise (which prompts, which images) around that mean, not the
spread between seeds: for that, each seed's own share (:func:`seed_shares`; their mean is the share of
the seeds' mean) gets a t-interval over the seeds (``gain_share/<task>/seeds_ci_low|high``).

Where a resample has the teacher at or below the base the share is undefined; it counts as +∞ (the
student gained) or −∞ (it did not), so a teacher whose own gain is not clear gives an unbounded
interval instead of a confident-looking one.
"""
from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from opd.evaluation.bootstrap import LEVEL, NUM_RESAMPLES, clustered_mean, resampled_means
from opd.results.over_seeds import t_interval


@dataclass(frozen=True)
class PromptScores:
    """One model's scores of one task's metric, by prompt (ordered by ``prompt_index``)."""

    source: str
    prompts: list[str]
    tags: list[str]
    groups: list[list[float]]


def samples_file(folder: Path) -> Path | None:
    """``samples.jsonl`` (or ``samples.jsonl.gz``) of an evaluation folder; None when neither exists."""
    for name in ("samples.jsonl", "samples.jsonl.gz"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def prompt_scores(samples: Path, checkpoint: str, task: str, key: str) -> PromptScores:
    """The values of score ``key`` of ``checkpoint``'s images of ``task`` in an evaluation's
    ``samples.jsonl[.gz]`` (:mod:`opd.evaluate`), grouped by prompt."""
    samples = Path(samples)
    opener = gzip.open if samples.suffix == ".gz" else open
    by_prompt: dict[int, list[tuple[int, float]]] = defaultdict(list)
    meta: dict[int, tuple[str, str]] = {}
    with opener(samples, "rt") as f:
        for line in f:
            record = json.loads(line)
            if record["checkpoint"] != checkpoint or record["task"] != task:
                continue
            if key not in record["scores"]:
                raise KeyError(f"{samples}: {checkpoint}'s {task} images have no score {key!r} "
                               f"(they have {sorted(record['scores'])})")
            p = record.get("prompt_index", record["index"])
            by_prompt[p].append((record.get("image_index", len(by_prompt[p])), float(record["scores"][key])))
            meta[p] = (record["prompt"], record.get("metadata", {}).get("tag", task))
    if not by_prompt:
        raise ValueError(f"{samples}: no images of checkpoint {checkpoint!r} on task {task!r}")
    order = sorted(by_prompt)
    return PromptScores(f"{samples}:{checkpoint}", [meta[p][0] for p in order], [meta[p][1] for p in order],
                        [[v for _, v in sorted(by_prompt[p], key=lambda iv: iv[0])] for p in order])


#: the largest difference of mean score, on the images both drew, between two evaluations of one model
#: (say its 16-image and its 4-image one) before they count as evaluations of different models
SAME_IMAGES_TOL = 0.01


def shared_images_gap(a: PromptScores, b: PromptScores) -> tuple[float, float, int]:
    """``(mean of a, mean of b, images)`` over the images both evaluations drew: per prompt (by
    position when both list the same prompts, else by text) the first images of each, by image
    index. Evaluations of one model with the same seeds draw the same first images (a noise seed per
    prompt and image), so the two means agree up to numerics (fp16 weights: about 1e-3); a larger gap
    means the model differs (its adapter, LoRA scale or CFG)."""
    if a.prompts == b.prompts:  # the same prompt list: by position (a prompt text may repeat)
        matched = zip(a.groups, b.groups, strict=True)
    else:
        theirs = dict(zip(b.prompts, b.groups, strict=True))
        matched = ((group, theirs.get(prompt, ())) for prompt, group in zip(a.prompts, a.groups, strict=True))
    pairs = [(x, y) for mine, other in matched for x, y in zip(mine, other)]
    if not pairs:
        raise ValueError(f"{a.source} and {b.source} share no images")
    return float(np.mean([x for x, _ in pairs])), float(np.mean([y for _, y in pairs])), len(pairs)


def share_interval(base: PromptScores, teacher: PromptScores, students: Sequence[PromptScores],
                   average: str = "image", *, num_resamples: int = NUM_RESAMPLES, level: float = LEVEL,
                   seed: int = 0) -> tuple[float, float, float]:
    """``(share, low, high)``: the students' (their seeds' mean) share of the teacher's gain over the
    base, and its ``level`` interval under paired prompt resampling (``average="tag"``: resample
    within tags, average the tag means, as the task's headline does). ±∞ bounds: see the module."""
    if not students:
        raise ValueError("share_interval: no student evaluations")
    if average not in ("image", "tag") or not 0 < level < 1:
        raise ValueError(f"share_interval: average={average!r} (use 'image' or 'tag'), level={level} (in (0, 1))")
    models = [base, teacher, *students]
    for other in models[1:]:
        if other.prompts != base.prompts:
            raise ValueError(f"{other.source} and {base.source} scored different prompts; evaluate both on "
                             "the same prompt set (same eval_tasks, max_prompts, images_per_prompt)")
    strata = base.tags if average == "tag" else None
    b, t = clustered_mean(base.groups, strata), clustered_mean(teacher.groups, strata)
    s = float(np.mean([clustered_mean(m.groups, strata) for m in students]))
    share = (s - b) / (t - b) if t > b else math.nan
    stats = resampled_means([m.groups for m in models], strata, num_resamples=num_resamples, seed=seed)
    rb, rt, rs = stats[0], stats[1], stats[2:].mean(axis=0)
    gained = rt > rb
    ratios = np.where(gained, (rs - rb) / np.where(gained, rt - rb, 1.0), np.where(rs >= rb, np.inf, -np.inf))
    low, high = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2], method="inverted_cdf")
    return share, float(low), float(high)


def seed_shares(base: PromptScores, teacher: PromptScores, students: Sequence[PromptScores],
                average: str = "image") -> list[float]:
    """Each student's (training seed's) own share of the teacher's gain over the base, the headline
    averaged as ``average`` says (NaN each when the teacher gained nothing)."""
    strata = base.tags if average == "tag" else None
    b, t = clustered_mean(base.groups, strata), clustered_mean(teacher.groups, strata)
    return [(clustered_mean(m.groups, strata) - b) / (t - b) if t > b else math.nan for m in students]


def projected_interval(base: PromptScores, teacher: PromptScores, students: Sequence[PromptScores],
                       images_per_prompt: int, level: float = LEVEL) -> tuple[float, float]:
    """The share's ``level`` interval expected with ``images_per_prompt`` images a prompt (normal
    approximation), from evaluations with equally many images a prompt, paired by image index.

    Each image gets the share's linearisation ``(s − r·t − (1 − r)·b) / (t − b)`` (``r`` the share; its
    student, teacher and base images of one prompt and image index come from one noise seed; several
    students: their mean). Its variance over prompts splits into the spread of the images within a
    prompt (``w``: shrinks with more images) and the spread between prompts (the rest, at least 0):
    ``se = √((between + w·K / images_per_prompt) / prompts)`` with ``K`` the images a prompt measured.
    Image-averaged tasks only. A projection for planning an evaluation, not a measurement."""
    models = [base, teacher, *students]
    counts = {len(g) for m in models for g in m.groups}
    if len(counts) != 1 or counts == {1}:
        raise ValueError(f"projected_interval: needs the same number (>= 2) of images on every prompt; got {sorted(counts)}")
    b, t = (np.asarray(m.groups, dtype=float) for m in (base, teacher))  # [prompt, image]
    s = np.mean([np.asarray(m.groups, dtype=float) for m in students], axis=0)
    gain = t.mean() - b.mean()
    if gain <= 0:
        raise ValueError("projected_interval: the teacher did not gain over the base; the share is undefined")
    r = (s.mean() - b.mean()) / gain
    per_image = (s - r * t - (1 - r) * b) / gain
    (num_prompts, measured), within = per_image.shape, float(per_image.var(axis=1, ddof=1).mean() / per_image.shape[1])
    between = max(float(per_image.mean(axis=1).var(ddof=1)) - within, 0.0)
    half = NormalDist().inv_cdf(1 - (1 - level) / 2) * math.sqrt((between + within * measured / images_per_prompt)
                                                                  / num_prompts)
    return r - half, r + half


def format_share(metrics: Mapping[str, float], task: str, unit: str = "%") -> str:
    """``94% [63, 134]``: ``gain_share/<task>`` of ``metrics`` in percent, with its interval where it has
    one (±∞ bounds as ``∞``/``−∞``), and ``87% [76, 98] over prompts, [79, 95] over seeds`` where
    the seeds' interval is there too; ``–`` without a finite share."""
    share = metrics.get(f"gain_share/{task}")
    if share is None or not math.isfinite(share):
        return "–"
    low, high = metrics.get(f"gain_share/{task}/ci_low"), metrics.get(f"gain_share/{task}/ci_high")
    bound = (lambda v: f"{100 * v:.0f}" if math.isfinite(v) else ("∞" if v > 0 else "−∞"))
    text = f"{100 * share:.0f}{unit}" + (f" [{bound(low)}, {bound(high)}]" if low is not None and high is not None else "")
    seeds = metrics.get(f"gain_share/{task}/seeds_ci_low"), metrics.get(f"gain_share/{task}/seeds_ci_high")
    if None not in seeds and low is not None:  # both intervals: say which is which
        text += f" over prompts, [{bound(seeds[0])}, {bound(seeds[1])}] over seeds"
    return text


def images_note(metrics: Mapping[str, float], task: str) -> str:
    """`` (16 images a prompt)``: how many images a prompt the evaluations behind ``gain_share/<task>``
    scored (``…/images_per_prompt``, :func:`row_shares`); empty where unknown."""
    n = metrics.get(f"gain_share/{task}/images_per_prompt")
    return f" ({n:.0f} image{'s' if n != 1 else ''} a prompt)" if n else ""


def _scores_from(folders: dict[str, Path], task: str, metric: str) -> dict[str, PromptScores] | None:
    """Every model's scores of ``task`` from its folder, or None when a folder lacks them."""
    scores = {}
    for name, folder in folders.items():
        found = samples_file(folder)
        if found is None:
            return None
        try:
            scores[name] = prompt_scores(found, name, task, metric)
        except ValueError:  # this evaluation did not sample the task
            return None
    return scores


def _check_same_models(scores: dict[str, PromptScores], reference: dict[str, Path], task: str, metric: str,
                       kind: str) -> None:
    """Raise when a model's ``kind`` evaluation does not repeat its regular one (``reference``) on the
    images both drew (:func:`shared_images_gap`); models without a regular evaluation pass."""
    for name, folder in reference.items():
        regular = _scores_from({name: folder}, task, metric)
        if regular is None:  # no regular evaluation, or one without the task
            continue
        mine, theirs, images = shared_images_gap(scores[name], regular[name])
        if abs(mine - theirs) > SAME_IMAGES_TOL:
            raise ValueError(
                f"{scores[name].source} does not repeat {regular[name].source} on the {images} images both drew ({task} "
                f"{metric}: mean {mine:.3f} against {theirs:.3f}, allowed gap {SAME_IMAGES_TOL}): the {kind} "
                f"evaluation scored another model than the {name!r} of the table (an adapter without its LoRA "
                "metadata loads at alpha = r; another CFG scale; other weights). Evaluate it again from the run's "
                "own adapter (python -m opd.results.ship_adapter keeps the metadata in fp16 copies).")


def row_shares(root: Path, base_dirs: dict[str, Path], runs: dict[str, dict], teachers_of: dict[str, Sequence[str]],
               own: dict[str, str], averages: dict[str, str], **bootstrap) -> dict[str, dict[str, float]]:
    """Per table row with teachers, ``{"gain_share/<task>": share, …/ci_low, …/ci_high,
    …/images_per_prompt}`` for each of its teachers (:func:`share_interval`), from the images' scores in
    ``samples.jsonl[.gz]``.

    ``base_dirs`` maps an evaluation folder name to the base's evaluation of that kind, in order of
    preference (e.g. ``{"dense": <base>/dense, "eval": <base>}``): for each task the first kind that
    base, teacher (``<root>/teacher_<t>/<kind>``) and every seed of the row (``<root>/<seed
    run>/<kind>``, ``runs[row]["seeds"]``) all have is used, so the three terms of a share always come
    from evaluations alike. A task no kind covers is left out (and said so). A row of several seeds also
    gets ``…/seeds_ci_low|high``, the t-interval of its seeds' own shares (:func:`seed_shares`). A kind
    other than ``eval`` must repeat each model's ``eval`` evaluation on the images both drew (images
    0–3 of a 16-image evaluation are the 4-image one's), else ValueError: it scored another model."""
    out: dict[str, dict[str, float]] = {}
    for key, teachers in teachers_of.items():
        seeds = runs.get(key, {}).get("seeds") or []
        for task in teachers:
            metric, scores = own[task].split("/", 1)[1], None
            for kind, base_dir in base_dirs.items() if seeds else ():
                scores = _scores_from({"base": Path(base_dir), f"teacher_{task}": Path(root) / f"teacher_{task}" / kind,
                                       **{seed: Path(root) / seed / kind for seed in seeds}}, task, metric)
                if scores:
                    break
            if not scores:
                print(f"[gain_share] {key}/{task}: no evaluation of {'/'.join(base_dirs)} with the images' scores "
                      f"of the base, the teacher and {seeds or 'its seeds'}; no interval")
                continue
            if kind != "eval" and "eval" in base_dirs:
                _check_same_models(scores, {"base": Path(base_dirs["eval"]),
                                            f"teacher_{task}": Path(root) / f"teacher_{task}" / "eval",
                                            **{seed: Path(root) / seed / "eval" for seed in seeds}}, task, metric, kind)
            base, teacher = scores.pop("base"), scores.pop(f"teacher_{task}")
            share, low, high = share_interval(base, teacher, list(scores.values()), averages.get(task, "image"), **bootstrap)
            per_prompt = min(len(g) for m in (base, teacher, *scores.values()) for g in m.groups)
            out.setdefault(key, {}).update({f"gain_share/{task}": share, f"gain_share/{task}/ci_low": low,
                                            f"gain_share/{task}/ci_high": high,
                                            f"gain_share/{task}/images_per_prompt": per_prompt})
            each = seed_shares(base, teacher, list(scores.values()), averages.get(task, "image"))
            if len(each) > 1 and all(math.isfinite(v) for v in each):
                _, seeds_low, seeds_high = t_interval(each)
                out[key].update({f"gain_share/{task}/seeds_ci_low": seeds_low, f"gain_share/{task}/seeds_ci_high": seeds_high})
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Print a student's share of a teacher's gain on one task, its interval and, with ``--project``,
    the interval expected with more images a prompt."""
    import argparse

    parser = argparse.ArgumentParser(description="A student's share of a teacher's gain, with its paired "
                                     "prompt-bootstrap interval (and projections to more images a prompt).")
    parser.add_argument("--task", required=True)
    parser.add_argument("--metric", required=True, help="the score key, e.g. geneval_mini_correct")
    for who in ("base", "teacher"):
        parser.add_argument(f"--{who}", required=True, metavar="SAMPLES:CHECKPOINT",
                            help="an evaluation's samples.jsonl[.gz] and the checkpoint's row in it")
    parser.add_argument("--student", required=True, action="append", metavar="SAMPLES:CHECKPOINT",
                        help="repeat for several seeds (their mean)")
    parser.add_argument("--average", default="image", choices=["image", "tag"])
    parser.add_argument("--project", type=int, nargs="*", default=[], metavar="IMAGES",
                        help="images a prompt to project the interval to")
    args = parser.parse_args(argv)

    def load(spec: str) -> PromptScores:
        path, _, checkpoint = spec.rpartition(":")
        if not path:
            raise SystemExit(f"{spec!r}: write SAMPLES:CHECKPOINT, e.g. runs/x/eval/samples.jsonl:x")
        return prompt_scores(Path(path), checkpoint, args.task, args.metric)

    base, teacher, students = load(args.base), load(args.teacher), [load(s) for s in args.student]
    share, low, high = share_interval(base, teacher, students, args.average)
    out = {"share": share, "ci_low": low, "ci_high": high, "images_per_prompt": len(base.groups[0])}
    print(f"{args.task}: share {share:.3f} [{low:.3f}, {high:.3f}] with {out['images_per_prompt']} images a prompt "
          f"({len(base.groups)} prompts, {len(students)} student evaluation(s))")
    for k in args.project:
        out[f"projected_{k}"] = projected_interval(base, teacher, students, k)
        print(f"  projected with {k} images a prompt: [{out[f'projected_{k}'][0]:.3f}, {out[f'projected_{k}'][1]:.3f}]")
    return out


if __name__ == "__main__":
    main()
