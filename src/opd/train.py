"""Training entry point: ``python -m opd.train experiment=<name> [overrides]``.

``train(cfg)`` builds everything from the composed config (Hydra ``_target_`` is the only
registry) and fits; ``main`` is the thin ``@hydra.main`` wrapper.

One run folder, one run: ``train`` holds ``<output_dir>/run.lock`` (created atomically, holding the
PID) while it runs, so a second run into the same folder is refused; a lock whose process is gone
is taken over with a warning. A fresh run refuses a folder that holds an earlier run's checkpoints,
adapter, model or exports unless it resumes (``ckpt_path=last`` or a path) or is told
``overwrite=true``, which first clears the earlier run's outputs.

Every run ends with its evaluation, in the same process and by the code of ``python -m opd.evaluate``
(:func:`opd.evaluation.run.evaluate_run`): the trained adapter against the base, or the pre-trained
model, into ``<output_dir>/eval/``; the training config's ``eval`` node holds its settings
(``eval=null`` skips it). Its settings and prompt files are checked before training starts.

Every process of a multi-process launch (``torchrun``, ``srun``) composes its own config; the run folder
they write into must still be one (:func:`default_run_dir`, Hydra's ``hydra.run.dir`` in conf/train.yaml):
``outputs/<date>/<time>`` for one process or the processes of one ``torchrun`` on one node (the time
its agent started), ``outputs/torchrun-<rdzv id>`` for a ``torchrun`` over several nodes,
``outputs/slurm-<job id>`` for the tasks of a SLURM job; only global rank 0 writes Hydra's ``.hydra/``
and ``train.log`` (the others ``train_rank<r>.log``). docs/cluster.md says how to launch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

import opd.config  # registers the structured-config schemas; validate_train_config
from opd.callbacks.curves import CurvePlot
from opd.evaluation.run import check_run_eval, evaluate_run
from opd.validate import check_ckpt_path

log = logging.getLogger(__name__)
#: the exit status of a run stopped before its end by SIGTERM or its time slice (sysexits' EX_TEMPFAIL:
#: "try again"): ``last.ckpt`` holds the step it stopped at and ``ckpt_path=last`` continues it
STOPPED_EXIT_CODE = 75
CONFIG_DIR = str(opd.config.config_dir())  # the checkout's conf/, or the copy inside an installed wheel


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``name: {_target_: ...}`` mapping (callbacks, loggers)."""
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path=last`` → ``<output_dir>/checkpoints/last.ckpt`` (clear error when absent)."""
    if cfg.ckpt_path != "last":
        return check_ckpt_path(cfg.ckpt_path)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"ckpt_path=last but {last} does not exist; resume inside the stopped "
                                "run's folder with hydra.run.dir=<that folder>")
    return check_ckpt_path(last)  # a truncated file names itself and the other checkpoints


LOCK_NAME = "run.lock"
#: what a run writes into its folder: an earlier run's outputs (the first four refuse a fresh run;
#: ``overwrite=true`` clears them all). Hydra's own ``.hydra/`` and log file are left alone.
EARLIER_OUTPUTS = ("checkpoints", "adapter", "model", "exports")
CLEARED_BY_OVERWRITE = (*EARLIER_OUTPUTS, "images", "csv", "tensorboard", "wandb", "eval", "curves.png")


class RunFolderError(RuntimeError):
    """The run folder is in use by another run, or holds an earlier run's outputs."""


def _is_global_zero() -> bool:
    """Whether this process is global rank 0 as its launcher set it (a plain ``python -m opd.train``
    is; Lightning's DDP workers, torchrun and SLURM tasks know their rank from the environment
    before any process group exists)."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                                                           "SLURM_PROCID"))


class LaunchError(RuntimeError):
    """The processes of a multi-process launch would not agree on their run folder."""


def _world_size() -> int:
    """How many processes this launch started: torchrun's (and Lightning's) ``WORLD_SIZE``, else the
    tasks of the SLURM step, else 1."""
    for var in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def launch_rank() -> int:
    """This process's global rank as its launcher set it: ``RANK`` (torchrun), else ``SLURM_PROCID``
    (one srun task per GPU), else 0."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _safe(name: str) -> str:
    return re.sub(r"[^-\w.]", "_", name)


def _torchrun_agent_start() -> float | None:
    """When the ``torchrun`` agent that started this process started (seconds since the epoch), from
    ``/proc``: the same number in every worker of one agent. ``None`` when the parent is not a
    ``torchrun`` agent (a wrapper script in between) or ``/proc`` is not there."""
    ppid = os.getppid()
    try:
        argv = Path(f"/proc/{ppid}/cmdline").read_bytes().split(b"\0")
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    args = [a.decode(errors="replace") for a in argv]
    if not any(a == "torch.distributed.run" or Path(a).name == "torchrun" for a in args):
        return None
    fields = _proc_stat(ppid)
    if fields is None:
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def default_run_dir(base: str, stamp: str) -> str:
    """The default run folder (``hydra.run.dir``, the ``opd_run_dir`` resolver of conf/train.yaml):
    ``<base>/<stamp>`` (``outputs/<date>/<time>``) for one process, and a folder every process of a
    multi-process launch names alike, though each composes its config (and ``stamp``) on its own:

    - the workers of one ``torchrun`` agent (one node): ``<base>/<date>/<time>`` of the agent's start;
    - ``torchrun`` over several nodes: ``<base>/torchrun-<rdzv id>`` (``--rdzv_id``, the same on every node);
    - the tasks of a SLURM job (``srun``, one task per GPU, or one ``torchrun`` per node without an
      ``--rdzv_id``): ``<base>/slurm-<job id>`` (an array task ``slurm-<array job id>_<task id>``); a
      requeued job keeps its id, hence its folder.

    Otherwise the processes would write into folders a second apart, so this raises
    :class:`LaunchError` naming the fixes (an explicit ``hydra.run.dir=<folder>`` never gets here)."""
    env = os.environ
    if _world_size() <= 1:
        return f"{base}/{stamp}"
    if "TORCHELASTIC_RUN_ID" in env:
        if env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE"):
            started = _torchrun_agent_start()
            if started is not None:
                return f"{base}/{time.strftime('%Y-%m-%d/%H-%M-%S', time.localtime(started))}"
        if env["TORCHELASTIC_RUN_ID"] not in ("", "none"):
            return f"{base}/torchrun-{_safe(env['TORCHELASTIC_RUN_ID'])}"
    if env.get("SLURM_JOB_ID"):
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            return f"{base}/slurm-{_safe(env['SLURM_ARRAY_JOB_ID'])}_{_safe(env['SLURM_ARRAY_TASK_ID'])}"
        return f"{base}/slurm-{_safe(env['SLURM_JOB_ID'])}"
    raise LaunchError(
        f"this is one of {_world_size()} processes, and nothing they share names their run folder: each would "
        "write into its own outputs/<date>/<time>. Give torchrun an id (--rdzv_id=<name>, the same on every node; "
        "--standalone on one node), or name the folder: hydra.run.dir=<folder> (the same path on every node). "
        "See docs/cluster.md")


def _rank_name() -> str | None:
    """``None`` on global rank 0; elsewhere the rank its launcher gave this process (``RANK`` or
    ``SLURM_PROCID``; ``<node>-<local rank>`` where only those are known)."""
    if launch_rank() == 0 and _is_global_zero():
        return None
    if any(os.environ.get(var, "").isdigit() for var in ("RANK", "SLURM_PROCID")):
        return str(launch_rank())
    env = os.environ
    return f"{env.get('NODE_RANK') or env.get('GROUP_RANK') or 0}-{env.get('LOCAL_RANK') or 0}"


def rank_zero_only(value: Any) -> Any:
    """``value`` on global rank 0, ``None`` elsewhere (the ``opd_rank_zero`` resolver:
    ``hydra.output_subdir``, so that one process writes ``.hydra/``)."""
    return value if _rank_name() is None else None


def rank_job_name(name: str) -> str:
    """``name`` on global rank 0, ``<name>_rank<r>`` elsewhere (the ``opd_job_name`` resolver:
    ``hydra.job.name``, which names each process's log file)."""
    rank = _rank_name()
    return name if rank is None else f"{name}_rank{rank}"


# The run folder is cached in the config: Lightning's own DDP launcher reads hydra.run.dir again after it
# has set WORLD_SIZE, and must get the folder this process chose. The rank ones are not: a submitit task
# (hydra/launcher=slurm) composes its config anew with the submitting process's cache copied in.
for _name, _resolver, _cached in (("opd_run_dir", default_run_dir, True), ("opd_rank_zero", rank_zero_only, False),
                                  ("opd_job_name", rank_job_name, False)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver, use_cache=_cached)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3... of ``/proc/<pid>/stat`` (state first, start time at index 19); None if unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (started at ``start``) still runs on this host; a zombie or a
    reused PID does not count."""
    if Path("/proc/self/stat").exists():
        fields = _proc_stat(pid)
        return fields is not None and fields[0] not in ("Z", "X") and (start is None or fields[19] == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(folder: Path) -> dict[str, Any]:
    """Create ``folder/run.lock`` atomically with this process's PID; refuse when a live run holds
    it; take over (with a warning) a lock whose process is gone. Returns the record written."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    stat = _proc_stat(os.getpid())
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "start": stat[19] if stat else None,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            return mine
        try:
            text = lock.read_text()
            held = json.loads(text)
            pid, host = int(held["pid"]), str(held.get("host"))
        except FileNotFoundError:
            continue  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunFolderError(f"{lock} exists but is unreadable ({err}); if no run is using {folder}, delete it"
                                 ) from err
        if host != socket.gethostname():
            raise RunFolderError(f"{folder} is in use by another run (pid {pid} on host {host}, since "
                                 f"{held.get('since')}; {lock}); if that run is gone, delete the lock file")
        if _alive(pid, held.get("start")):
            raise RunFolderError(f"{folder} is in use by another run (pid {pid}, since {held.get('since')}: "
                                 f"{' '.join(map(str, held.get('argv') or []))}); two runs in one folder would mix "
                                 "their checkpoints: wait for it, stop it, or pick another folder (hydra.run.dir=...)")
        # stale: move it aside atomically, and check that what moved is the stale lock judged above
        aside = folder / f"{LOCK_NAME}.stale.{os.getpid()}"
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            continue
        if aside.read_text() != text:  # another process took it over in between: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, lock)
            aside.unlink()
            continue
        aside.unlink()
        log.warning("taking over the run lock of pid %s (since %s), which is no longer running: %s",
                    pid, held.get("since"), lock)
    raise RunFolderError(f"could not acquire {lock}: other processes keep taking it")


def release_lock(folder: Path, record: dict[str, Any]) -> None:
    """Remove ``folder``'s lock if it is still the one ``record`` describes."""
    lock = folder / LOCK_NAME
    with contextlib.suppress(OSError, ValueError):
        held = json.loads(lock.read_text())
        if (held.get("pid"), held.get("start")) == (record["pid"], record["start"]):
            lock.unlink()


def earlier_outputs(folder: Path) -> list[str]:
    """The outputs of an earlier run in ``folder`` (non-empty checkpoints/, adapter/, model/, exports/)."""
    return sorted(name for name in EARLIER_OUTPUTS if (folder / name).exists() and
                  (not (folder / name).is_dir() or any((folder / name).iterdir())))


@contextlib.contextmanager
def claim_run_folder(folder: Path, ckpt_path: str | None, overwrite: bool = False) -> Iterator[None]:
    """Hold ``folder``'s run lock for the body; refuse a fresh run into a folder holding an earlier
    run's outputs unless ``overwrite`` (which clears them first) or resuming (``ckpt_path``).
    Only the launching process (global rank 0) checks and locks; DDP workers share its folder."""
    if not _is_global_zero():
        yield
        return
    folder = Path(folder)
    record = acquire_lock(folder)
    try:
        found = earlier_outputs(folder)
        if found and ckpt_path is None and not overwrite:
            raise RunFolderError(
                f"{folder} already holds an earlier run's {', '.join(found)}: a fresh run would mix its outputs with "
                "them (and ckpt_path=last would later resume the old run). Resume it with ckpt_path=last, pick a new "
                "folder (hydra.run.dir=...), or pass overwrite=true to delete them first")
        if overwrite:
            _clear(folder, ckpt_path)
        yield
    finally:
        release_lock(folder, record)


def _clear(folder: Path, ckpt_path: str | None) -> None:
    doomed = [folder / name for name in CLEARED_BY_OVERWRITE if (folder / name).exists()]
    if ckpt_path is not None:
        resume = Path(ckpt_path).resolve()
        if any(resume == d.resolve() or d.resolve() in resume.parents for d in doomed):
            raise RunFolderError(f"overwrite=true would delete {ckpt_path}, the checkpoint to resume from; "
                                 "drop overwrite=true or ckpt_path")
    for path in doomed:
        log.warning("overwrite=true: deleting the earlier run's %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build data, module, callbacks, loggers and trainer from ``cfg``; fit in the claimed run
    folder, then evaluate what the run produced (see the module docstring). Returns ``(metrics,
    objects)``: the trainer's last metrics plus, after the evaluation, ``eval/<row>/<metric>`` for
    every value of its results.json (also ``objects["eval"]``)."""
    opd.config.validate_train_config(cfg)  # every bad value fails here, before anything is built (opd.validate)
    eval_cfg = check_run_eval(cfg)  # the end-of-run evaluation's settings and prompt files, checked now
    ckpt_path = resolve_ckpt_path(cfg)
    with claim_run_folder(Path(cfg.paths.output_dir), ckpt_path, overwrite=bool(cfg.get("overwrite", False))):
        with _training_precision():
            metrics, objects = _fit(cfg, ckpt_path)
        if eval_cfg is not None:
            if objects["trainer"].interrupted:
                log.warning("the run was interrupted: no end-of-run evaluation")
            else:
                results = evaluate_run(cfg, objects["trainer"], eval_cfg)
                objects["eval"] = results
                metrics.update({f"eval/{row}/{name}": float(value) for row, values in (results or {}).items()
                                for name, value in values.items()})
        return metrics, objects


@contextlib.contextmanager
def _training_precision() -> Iterator[None]:
    """TF32 matmuls on Ampere+ for the fp32 parts of training; the flags are restored afterwards, so
    that the end-of-run evaluation computes what ``python -m opd.evaluate`` computes."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def datamodule_config(cfg: DictConfig) -> DictConfig | None:
    """``cfg.data``, or ``None`` for an experiment that draws its own prompts (``data: null``). Such an
    experiment may still carry ``data.*`` values from a shared group (``debug=default`` shrinks the
    pre-training batch): without a ``_target_`` they are logged and ignored."""
    data = cfg.get("data")
    if data is None or "_target_" in data:
        return data
    log.info("data.{%s} ignored: this experiment has no data module (it draws its own prompts)",
             ", ".join(map(str, data)))
    return None


class _TrainEndSeen(pl.Callback):
    """Notes whether Lightning ran the end-of-training hooks (it skips them, with every other training
    hook, when a resumed checkpoint is already at ``max_steps``)."""

    seen = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = True


def _finish_without_training(trainer: pl.Trainer, module: pl.LightningModule, ckpt_path: str) -> None:
    """A resume from a checkpoint already at (or past) ``max_steps``: a run stopped between its last
    checkpoint and its exports, or one ended early with a lower ``trainer.max_steps``. Lightning trains
    nothing and runs no end-of-training hook, so the run would end without its adapter, silently, and
    a make chain waiting for that file would start it again and again. Run those hooks here, on the
    restored state (the EMA weights included): the adapter and the curves are written as at the end of
    training. Not the preview grid: after ``fit`` the model may be back on the CPU, where sampling an
    SD3.5 preview would take many minutes (the grid of the last step drawn stays)."""
    log.info("%s is at step %d, at or past trainer.max_steps=%d: nothing to train; finishing the run "
             "(its end-of-training exports) from the checkpoint", ckpt_path, trainer.global_step, trainer.max_steps)
    for callback in trainer.callbacks:
        if isinstance(callback, CurvePlot):
            callback.on_train_end(trainer, module)
    module.on_train_end()


def _fit(cfg: DictConfig, ckpt_path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    pl.seed_everything(cfg.seed, workers=True)
    data_cfg = datamodule_config(cfg)
    datamodule = hydra.utils.instantiate(data_cfg) if data_cfg is not None else None
    module = hydra.utils.instantiate(cfg.module)
    if cfg.get("allow_teacher_change") and hasattr(module, "allow_teacher_change"):
        module.allow_teacher_change = True
    callbacks = instantiate_dict(cfg.get("callbacks"))
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    objects = {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer}
    log.info("output folder: %s", cfg.paths.output_dir)
    end_seen = _TrainEndSeen()
    trainer.callbacks.append(end_seen)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if not end_seen.seen and ckpt_path is not None and trainer.max_steps >= 0 \
            and trainer.global_step >= trainer.max_steps:
        _finish_without_training(trainer, module, ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("done; outputs in %s", cfg.paths.output_dir)
    return metrics, objects


#: library messages that say nothing about a run of opd (matched against the start of the text)
KNOWN_NOISE = (
    # peft: opd holds the student and every teacher as adapters of one backbone on purpose
    "Already found a `peft_config` attribute in the model",
    # lightning's own use of a deprecated torch pytree API
    "`isinstance(treespec, LeafSpec)` is deprecated",
    # our modules step inside training_step; the state after the step is what resuming needs
    # (tests/test_kill_resume.py resumes to the same losses)
    "Using ModelCheckpoint with manual optimization",
)


class _DropTips(logging.Filter):
    """Lightning's advertising "💡 Tip" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise() -> None:
    """Silence the library messages in :data:`KNOWN_NOISE` and Lightning's tips (a run's own
    warnings and errors still show)."""
    for text in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(text))
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_known_noise()
    OmegaConf.resolve(cfg)
    try:
        metrics, _ = train(cfg)
    except SIGTERMException:
        # Lightning's SIGTERMException is a SystemExit without a code: the process would exit 0 and a
        # scheduler or make would take the stopped run for a finished one
        log.warning("stopped before the end (SIGTERM or callbacks.time_slice): exit status %d; the same command "
                    "with ckpt_path=last continues from %s", STOPPED_EXIT_CODE,
                    Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
        sys.exit(STOPPED_EXIT_CODE)
    return optimized_value(cfg, metrics)


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value of ``cfg.optimized_metric`` for Hydra's sweepers (logged), ``None`` when unset; a name
    the run did not produce is an error (a sweeper would otherwise optimise ``None``)."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r}: the run produced no such metric; it has "
                       f"{', '.join(sorted(metrics)[:40])}{' ...' if len(metrics) > 40 else ''}")
    log.info("optimized_metric %s = %.6g", name, metrics[name])
    return metrics[name]


if __name__ == "__main__":
    # `python -m opd.train` runs this file as __main__; call the importable module's main instead, so that
    # multirun launchers that send the task to other processes (hydra/launcher=local, slurm) pickle it
    # by reference rather than by value (which fails on torch's module objects)
    from opd.train import main as importable_main

    importable_main()
