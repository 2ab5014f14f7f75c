"""Run a plan of shell jobs on the GPUs of one machine, concurrently, respecting dependencies.

    python scripts/run_jobs.py scripts/plans/mini_table1_teachers.yaml --root runs/table1 [--set K=V ...]

A plan is a YAML file ``{vars: {...}, jobs: [{name, gpu, cmd, after}]}``. ``cmd`` is a shell
command formatted with ``{root}``, ``{run}`` (= ``<root>/<name>``), ``{name}``, ``{skill}`` (the name's last ``_`` part), ``{experiment}`` (the job's
``experiment`` key, else its name), ``{gpu}`` and the plan's
``vars`` (overridable with ``--set``) and the job's own ``vars`` (which may use the plan's); it runs with ``CUDA_VISIBLE_DEVICES=<gpu>`` (``gpu: null``
hides the GPUs), its output going to ``<root>/logs/<name>.log``. A job starts once every job it
names in ``after`` has succeeded; a failed job skips its dependants (unless a dependant says
``tolerate_failures: true``: it starts once they have all finished). Several jobs may share a GPU
(the mini world's models leave an H100 mostly idle). ``<root>/jobs.json`` records each job's
command, start, end, minutes and exit code; it is rewritten as jobs finish, so it survives a kill.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def load_plan(path: Path, overrides: list[str]) -> tuple[list[dict], dict]:
    plan = yaml.safe_load(path.read_text())
    variables = dict(plan.get("vars") or {})
    for item in overrides:
        key, _, value = item.partition("=")
        variables[key] = value
    jobs = plan.get("jobs") or []
    names = [j["name"] for j in jobs]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: duplicate job names")
    for job in jobs:
        unknown = set(job.get("after") or []) - set(names)
        if unknown:
            raise SystemExit(f"{path}: job {job['name']!r} waits for unknown job(s) {sorted(unknown)}")
    return jobs, variables


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-parallel", type=int, default=0, help="at most this many jobs at once (0: no limit)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these jobs (dependencies must exist)")
    args = parser.parse_args()
    jobs, variables = load_plan(args.plan, args.set)
    if args.only is not None:  # dependencies outside the selection count as done
        jobs = [dict(j, after=[d for d in j.get("after") or [] if d in args.only])
                for j in jobs if j["name"] in args.only]
    root = args.root.resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    record_file = root / "jobs.json"
    records = json.loads(record_file.read_text()) if record_file.exists() else {}
    pending = {j["name"]: j for j in jobs}
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    status: dict[str, str] = {n: r["status"] for n, r in records.items() if r.get("status") == "ok"}

    def write() -> None:
        record_file.write_text(json.dumps(records, indent=1))

    while pending or running:
        for name, job in list(pending.items()):
            deps = job.get("after") or []
            tolerant = job.get("tolerate_failures", False)  # e.g. picking the best of the candidates that ran
            finished = all(status.get(d) in ("ok", "failed", "skipped") for d in deps)
            if not tolerant and any(status.get(d) in ("failed", "skipped") for d in deps):
                status[name] = "skipped"
                records[name] = {"status": "skipped", "cmd": job["cmd"]}
                pending.pop(name)
                print(f"[jobs] skip {name}: a dependency failed", flush=True)
            elif args.max_parallel and len(running) >= args.max_parallel:
                break
            elif all(status.get(d) == "ok" for d in deps) or (tolerant and finished):
                run = root / name
                fields = {"root": root, "run": run, "name": name, "gpu": job.get("gpu"),
                          "skill": name.rpartition("_")[2], "experiment": job.get("experiment", name)}
                values = {k: str(v).format(**fields) for k, v in variables.items()}  # vars may use the fields
                # a job's own vars may use the fields and the plan's vars, and override the latter
                values |= {k: str(v).format(**fields, **values) for k, v in (job.get("vars") or {}).items()}
                cmd = " ".join(job["cmd"].split()).format(**fields, **values)
                env = dict(os.environ, CUDA_VISIBLE_DEVICES="" if job.get("gpu") is None else str(job["gpu"]))
                with open(root / "logs" / f"{name}.log", "w") as log:  # the child keeps its own handle
                    proc = subprocess.Popen(cmd, shell=True, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[name] = (proc, time.time())
                records[name] = {"status": "running", "cmd": cmd, "gpu": job.get("gpu"), "start": time.time()}
                pending.pop(name)
                print(f"[jobs] start {name} on gpu {job.get('gpu')}: {cmd}", flush=True)
        for name, (proc, start) in list(running.items()):
            if proc.poll() is None:
                continue
            end = time.time()
            ok = proc.returncode == 0
            status[name] = "ok" if ok else "failed"
            records[name].update(status=status[name], end=end, minutes=round((end - start) / 60, 2),
                                 returncode=proc.returncode)
            running.pop(name)
            print(f"[jobs] {status[name]} {name} after {(end - start) / 60:.1f} min", flush=True)
            if not ok:
                tail = (root / "logs" / f"{name}.log").read_text().splitlines()[-15:]
                print("\n".join(f"    {line}" for line in tail), flush=True)
        write()
        time.sleep(2)
    failed = [n for n, s in status.items() if s != "ok"]
    print(f"[jobs] done; failed/skipped: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
