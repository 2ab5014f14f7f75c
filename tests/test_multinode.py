"""One run folder for all the processes of a launch (docs/cluster.md): under ``torchrun`` (one node or
several) and SLURM (``srun``, one task per GPU) every process composes its own config, yet all write into
one folder, rank 0 alone writes Hydra's ``.hydra/`` and ``train.log``, and ``ckpt_path=last`` finds the
same checkpoint on every rank. ``trainer.num_nodes`` sizes the run and the SLURM launcher.

The unit tests set the launchers' environment variables by hand; the end-to-end ones run real
2-process CPU (gloo) trainings of a toy model: ``torchrun`` on one node, ``torchrun`` as two "nodes" of
one process each, Lightning's own launcher from one ``python -m opd.train``, and two processes started
the way ``srun`` starts them (SLURM's variables, no SLURM), then the same "job" again resuming.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import opd.train as train_module
from conftest import CONF, ROOT
from opd.train import LaunchError, default_run_dir, rank_job_name, rank_zero_only

#: every variable by which a launcher tells a process where it stands
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE",
               "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID",
               "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS",
               "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_JOB_NAME", "SLURM_NODELIST",
               "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "OPD_NUM_GPUS", "OPD_NUM_NODES")
DATE_TIME = re.compile(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d")


@pytest.fixture
def launch_env(monkeypatch):
    """A clean slate (none of the launchers' variables), and a setter for them."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)

    def set_env(**values):
        for var, value in values.items():
            monkeypatch.setenv(var, str(value))
    return set_env


def test_one_process_gets_the_date_and_time(launch_env):
    assert default_run_dir("outputs", "2025-01-02/03-04-05") == "outputs/2025-01-02/03-04-05"
    launch_env(SLURM_JOB_ID=77, SLURM_NTASKS=1, SLURM_PROCID=0)  # one task of a SLURM job: one process
    assert default_run_dir("outputs", "2025-01-02/03-04-05") == "outputs/2025-01-02/03-04-05"
    assert rank_zero_only(".hydra") == ".hydra" and rank_job_name("train") == "train"


@pytest.mark.parametrize("rank", [0, 3])
def test_the_tasks_of_a_slurm_job_share_its_id(launch_env, rank):
    launch_env(SLURM_JOB_ID=4242, SLURM_NTASKS=4, SLURM_PROCID=rank, SLURM_LOCALID=rank)
    assert default_run_dir("outputs", f"stamp-of-rank-{rank}") == "outputs/slurm-4242"
    launch_env(SLURM_ARRAY_JOB_ID=4000, SLURM_ARRAY_TASK_ID=7)  # a task of a job array: its own folder
    assert default_run_dir("outputs", "x") == "outputs/slurm-4000_7"
    # only global rank 0 writes .hydra/ and train.log
    assert rank_zero_only(".hydra") == (".hydra" if rank == 0 else None)
    assert rank_job_name("train") == ("train" if rank == 0 else "train_rank3")


def test_torchrun_over_nodes_uses_its_rendezvous_id(launch_env):
    launch_env(TORCHELASTIC_RUN_ID="exp/1", WORLD_SIZE=4, LOCAL_WORLD_SIZE=2, RANK=2, LOCAL_RANK=0, GROUP_RANK=1)
    assert default_run_dir("outputs", "x") == "outputs/torchrun-exp_1"
    assert rank_zero_only(".hydra") is None and rank_job_name("train") == "train_rank2"
    # without --rdzv_id ("none") inside a SLURM job (one torchrun per node): the job's id
    launch_env(TORCHELASTIC_RUN_ID="none", SLURM_JOB_ID=99, SLURM_NTASKS=2, SLURM_PROCID=1)
    assert default_run_dir("outputs", "x") == "outputs/slurm-99"


def test_a_rank_known_only_by_node_and_local_rank_logs_under_both(launch_env):
    launch_env(NODE_RANK=1, LOCAL_RANK=2)  # Lightning's own multi-machine mode, started by hand
    assert rank_job_name("train") == "train_rank1-2" and rank_zero_only(".hydra") is None


def test_ranks_that_share_nothing_are_told_what_to_do(launch_env):
    launch_env(TORCHELASTIC_RUN_ID="none", WORLD_SIZE=4, LOCAL_WORLD_SIZE=2, RANK=1)
    with pytest.raises(LaunchError, match=r"one of 4 processes.*--rdzv_id=<name>.*hydra\.run\.dir=<folder>"):
        default_run_dir("outputs", "x")


def test_one_torchrun_agent_names_the_folder_by_its_start(launch_env, monkeypatch):
    launch_env(TORCHELASTIC_RUN_ID="none", WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, RANK=1, LOCAL_RANK=1)
    started = 1_700_000_000.25
    monkeypatch.setattr(train_module, "_torchrun_agent_start", lambda: started)
    expected = "outputs/" + time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(started))
    assert default_run_dir("outputs", "this rank's own clock") == expected
    # a parent that is no torchrun agent (a wrapper script): the rendezvous id, else the error
    monkeypatch.setattr(train_module, "_torchrun_agent_start", lambda: None)
    with pytest.raises(LaunchError):
        default_run_dir("outputs", "x")
    launch_env(TORCHELASTIC_RUN_ID="0b5c")  # what --standalone makes up
    assert default_run_dir("outputs", "x") == "outputs/torchrun-0b5c"


def compose_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", [f"paths.root_dir={ROOT}", *overrides], return_hydra_config=True)


def test_the_composed_config_gives_every_rank_the_same_folder(launch_env):
    seen = []
    for rank in (0, 1):
        launch_env(SLURM_JOB_ID=5150, SLURM_NTASKS=2, SLURM_PROCID=rank)
        cfg = compose_hydra(["experiment=mini/sopd_ocr"])
        seen.append((cfg.hydra.run.dir, cfg.hydra.output_subdir, cfg.hydra.job.name))
    assert seen == [("outputs/slurm-5150", ".hydra", "train"), ("outputs/slurm-5150", None, "train_rank1")]
    launch_env(SLURM_NTASKS=1)
    cfg = compose_hydra([])
    chosen = cfg.hydra.run.dir
    assert DATE_TIME.fullmatch(chosen.removeprefix("outputs/"))
    # Lightning's own DDP launcher sets WORLD_SIZE in this process, then reads hydra.run.dir again for
    # the processes it starts: the folder chosen stays (test_lightning_ddp_... runs it for real)
    launch_env(WORLD_SIZE=2, LOCAL_RANK=0, NODE_RANK=0)
    assert cfg.hydra.run.dir == chosen
    assert compose_hydra(["hydra.run.dir=/shared/run"]).hydra.run.dir == "/shared/run"  # explicit wins


def test_num_nodes_is_exposed_and_sizes_the_slurm_launcher(launch_env):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.core.plugins import Plugins

    assert compose_hydra([]).trainer.num_nodes == 1
    launch_env(OPD_NUM_GPUS=4, OPD_NUM_NODES=2)
    cfg = compose_hydra(["trainer=ddp", "hydra/launcher=slurm"])
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)
    launcher = Plugins.instance()._instantiate(cfg.hydra.launcher)  # what Hydra builds for `-m`
    assert {k: launcher.params[k] for k in ("nodes", "tasks_per_node", "gpus_per_node")} == \
           {"nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4}
    launcher = Plugins.instance()._instantiate(compose_hydra(["trainer=gpu", "hydra/launcher=slurm",
                                                              "trainer.num_nodes=3"]).hydra.launcher)
    assert {k: launcher.params[k] for k in ("nodes", "tasks_per_node", "gpus_per_node")} == \
           {"nodes": 3, "tasks_per_node": 1, "gpus_per_node": 1}


def test_fsdp_is_gone_with_a_pointer_to_why():
    assert not (CONF / "trainer" / "fsdp.yaml").exists()
    assert "## Why there is no FSDP" in (ROOT / "docs" / "cluster.md").read_text()


# ---- end to end: real 2-process CPU runs --------------------------------------------------------------

RUN = ["experiment=mini/teacher_ocr", "model.image_size=16", "trainer=cpu", "++trainer.strategy=ddp", "logger=csv",
       "trainer.enable_progress_bar=false", "trainer.max_time=null", "callbacks.image_grid=null", "callbacks.curves=null",
       "sampler.num_steps=2", "module.num_groups_per_round=2", "module.group_size=2", "module.lora={rank:2,alpha:4}",
       "eval=null", "callbacks.model_checkpoint.every_n_train_steps=1"]
TIMEOUT_S = 400


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    from test_models import toy

    root = tmp_path_factory.mktemp("multinode")
    toy(seed=4).save_pretrained(root / "base", dtype=torch.float32)
    return root / "base"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", **{k: str(v) for k, v in extra.items()}}


def wait_all(procs, logs) -> None:
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=TIMEOUT_S))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    text = "\n".join(Path(log).read_text()[-3000:] for log in logs)
    assert codes == [0] * len(procs), text


def the_run_folder(cwd: Path) -> Path:
    """The one folder the launch wrote (the test's working folder holds nothing else)."""
    folders = [p for p in (cwd / "outputs").rglob("*") if (p / "train.log").is_file()]
    assert len(folders) == 1, folders
    return folders[0]


def check_one_folder_for_all(run: Path, ranks: int) -> None:
    assert (run / ".hydra" / "config.yaml").is_file()  # rank 0's
    assert (run / "train.log").is_file() and all((run / f"train_rank{r}.log").is_file() for r in range(1, ranks))
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "adapter").is_dir()


def global_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]


def test_torchrun_on_one_node_writes_one_folder_named_by_its_start(toy_base, tmp_path):
    """``torchrun --nproc_per_node 2`` (static rendezvous, no id): both workers of the agent name the
    folder by the agent's start, outputs/<date>/<time> as for one process."""
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "-m", "opd.train", *RUN, f"model.path={toy_base}", "trainer.devices=2", "trainer.max_steps=2"],
            cwd=tmp_path, env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    wait_all([proc], [log])
    run = the_run_folder(tmp_path)
    assert DATE_TIME.fullmatch(run.relative_to(tmp_path / "outputs").as_posix()), run
    check_one_folder_for_all(run, 2)


@pytest.mark.slow  # a real 2-process run (25-40 s); the fast suite keeps the one-node torchrun run
def test_torchrun_over_two_nodes_shares_the_rendezvous_folder(toy_base, tmp_path):
    """Two torchrun agents (two "nodes" of one process each, c10d rendezvous) and trainer.num_nodes=2."""
    endpoint, procs, logs = f"127.0.0.1:{free_port()}", [], []
    for node in (0, 1):
        logs.append(tmp_path / f"node{node}.log")
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                 "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "exp7",
                 "-m", "opd.train", *RUN, f"model.path={toy_base}", "trainer.devices=1", "trainer.num_nodes=2",
                 "trainer.max_steps=1"], cwd=tmp_path, env=clean_env(), stdout=out, stderr=subprocess.STDOUT))
    wait_all(procs, logs)
    run = the_run_folder(tmp_path)
    assert run == tmp_path / "outputs" / "torchrun-exp7"
    check_one_folder_for_all(run, 2)


@pytest.mark.slow  # a real 2-process run (25-40 s); the fast suite keeps the one-node torchrun run
def test_lightning_ddp_from_one_process_keeps_its_folder(toy_base, tmp_path):
    """``python -m opd.train trainer.devices=2`` on one machine: Lightning starts the second process
    itself, into the first one's folder (its ``hydra.run.dir``, ``train_ddp_process_1.log``)."""
    log = tmp_path / "spawn.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "opd.train", *RUN, f"model.path={toy_base}", "trainer.devices=2",
                                 "trainer.max_steps=1"], cwd=tmp_path, env=clean_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    wait_all([proc], [log])
    run = the_run_folder(tmp_path)
    assert DATE_TIME.fullmatch(run.relative_to(tmp_path / "outputs").as_posix()), run
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "train_ddp_process_1.log").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "adapter").is_dir()


def srun(toy_base, cwd: Path, job: int, overrides: list[str], name: str) -> None:
    """Two processes started as ``srun --ntasks-per-node 2`` starts them: SLURM's variables, no torchrun."""
    port, procs, logs = free_port(), [], []
    for rank in (0, 1):
        logs.append(cwd / f"{name}{rank}.log")
        env = clean_env(SLURM_JOB_ID=job, SLURM_JOB_NAME="opd", SLURM_NTASKS=2, SLURM_NTASKS_PER_NODE=2,
                        SLURM_NNODES=1, SLURM_NODEID=0, SLURM_PROCID=rank, SLURM_LOCALID=rank,
                        SLURM_NODELIST="127.0.0.1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "opd.train", *RUN, f"model.path={toy_base}", "trainer.devices=2", *overrides],
                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT))
    wait_all(procs, logs)


@pytest.mark.slow  # a real 2-process run (25-40 s); the fast suite keeps the one-node torchrun run
def test_slurm_tasks_share_the_job_folder_and_a_requeued_job_resumes_there(toy_base, tmp_path):
    srun(toy_base, tmp_path, 31337, ["trainer.max_steps=1"], "first")
    run = the_run_folder(tmp_path)
    assert run == tmp_path / "outputs" / "slurm-31337"
    check_one_folder_for_all(run, 2)
    # the same job again (a requeue keeps the id): ckpt_path=last on both ranks means the same file
    first = global_step(run)
    srun(toy_base, tmp_path, 31337, [f"trainer.max_steps={first + 1}", "ckpt_path=last"], "again")
    assert the_run_folder(tmp_path) == run
    assert global_step(run) > first  # one more round, resumed (a round takes several optimiser steps)
    assert "Restoring states from the checkpoint" in (tmp_path / "again0.log").read_text()


def test_a_launch_whose_ranks_share_nothing_stops_before_training(tmp_path):
    env = clean_env(TORCHELASTIC_RUN_ID="none", WORLD_SIZE=2, LOCAL_WORLD_SIZE=1, RANK=1, LOCAL_RANK=0)
    done = subprocess.run([sys.executable, "-m", "opd.train", "experiment=mini/teacher_ocr"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode != 0
    assert "nothing they share names their run folder" in done.stderr + done.stdout
    assert not (tmp_path / "outputs").exists()
