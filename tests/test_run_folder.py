"""One run folder, one run: the lock file, refusing an earlier run's outputs, ``overwrite=true``.

(A real ``python -m opd.train`` killed with SIGKILL leaves its lock behind; the resume taking it over
is tested in tests/test_kill_resume.py.)
"""
from __future__ import annotations

import json
import logging
import socket
import subprocess

import pytest
from omegaconf import OmegaConf

from opd.train import LOCK_NAME, RunFolderError, _proc_stat, acquire_lock, claim_run_folder, train
from test_pretrain import SMALL


def earlier_run(folder):
    """What an earlier run leaves behind (besides Hydra's own files)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"old")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"old")
    (folder / "csv" / "version_0").mkdir(parents=True)
    (folder / "curves.png").write_bytes(b"old")
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("new: run\n")
    (folder / "notes.txt").write_text("mine")


def write_lock(folder, pid, host=None, start=None):
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "start": start,
                                                "since": "earlier", "argv": ["python", "-m", "opd.train"]}))


def test_a_fresh_run_refuses_a_folder_holding_an_earlier_runs_outputs(cfg_factory, tmp_path):
    earlier_run(tmp_path)
    cfg = cfg_factory("train", ["experiment=pretrain_mini", *SMALL, "trainer.max_steps=1"])
    OmegaConf.resolve(cfg)
    with pytest.raises(RunFolderError, match="already holds an earlier run's adapter, checkpoints.*ckpt_path=last.*"
                                             "overwrite=true"):
        train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == b"old"  # nothing touched
    assert not (tmp_path / LOCK_NAME).exists()  # the lock is released on the way out


def test_overwrite_clears_the_earlier_outputs_and_keeps_the_rest(tmp_path, caplog):
    earlier_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="opd.train"), claim_run_folder(tmp_path, None, overwrite=True):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] > 0
        for gone in ("checkpoints", "adapter", "csv", "curves.png"):
            assert not (tmp_path / gone).exists()
        assert (tmp_path / ".hydra" / "config.yaml").is_file() and (tmp_path / "notes.txt").is_file()
    assert "overwrite=true: deleting" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_resuming_is_allowed_and_overwrite_may_not_delete_the_checkpoint_it_resumes(tmp_path):
    earlier_run(tmp_path)
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    with claim_run_folder(tmp_path, last):
        pass
    with pytest.raises(RunFolderError, match="would delete .*last.ckpt, the checkpoint to resume from"), \
            claim_run_folder(tmp_path, last, overwrite=True):
        pass
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").unlink()
    (tmp_path / "adapter").rmdir()
    (tmp_path / "checkpoints" / "last.ckpt").unlink()  # an empty checkpoints/ (a run that saved nothing)
    with claim_run_folder(tmp_path, None):
        pass


def test_a_live_run_holds_the_folder(tmp_path):
    other = subprocess.Popen(["sleep", "60"])
    try:
        stat = _proc_stat(other.pid)
        write_lock(tmp_path, other.pid, start=stat[19] if stat else None)
        with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {other.pid}, since earlier"), \
                claim_run_folder(tmp_path, None):
            pass
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == other.pid  # left alone
    finally:
        other.kill()
        other.wait()
    # the same PID number with another start time is a reused PID, not the run that wrote the lock
    write_lock(tmp_path, 1, start="-1")
    acquire_lock(tmp_path)


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_lock(tmp_path, gone.pid)
    with caplog.at_level(logging.WARNING, logger="opd.train"), claim_run_folder(tmp_path, None):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] != gone.pid
    assert f"taking over the run lock of pid {gone.pid}" in caplog.text
    assert not list(tmp_path.iterdir())  # no lock, no side files left


def test_locks_of_other_hosts_and_unreadable_locks_are_not_guessed_at(tmp_path):
    write_lock(tmp_path, 12345, host="elsewhere")
    with pytest.raises(RunFolderError, match="pid 12345 on host elsewhere.*delete the lock file"), \
            claim_run_folder(tmp_path, None):
        pass
    (tmp_path / LOCK_NAME).write_text("{not json")
    with pytest.raises(RunFolderError, match="unreadable"), claim_run_folder(tmp_path, None):
        pass


@pytest.mark.parametrize("rank_var", ["LOCAL_RANK", "RANK", "SLURM_PROCID"])
def test_ddp_workers_neither_lock_nor_check(tmp_path, monkeypatch, rank_var):
    """Lightning's DDP workers re-run ``python -m opd.train`` into the launching rank's folder; torchrun's
    and srun's other ranks share rank 0's folder too (tests/test_multinode.py)."""
    earlier_run(tmp_path)
    write_lock(tmp_path, 1)
    monkeypatch.setenv(rank_var, "1")
    with claim_run_folder(tmp_path, None):
        pass
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == 1
