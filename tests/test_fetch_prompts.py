"""``python -m opd.data.fetch_prompts`` / ``make prompts`` against a local HTTP server laid out like
raw.githubusercontent.com (``<owner>/<repo>/<commit>/<path>``), and the committed manifest."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import socket
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest

import opd.data.fetch_prompts as fp
from opd.data.prompt_files import load_prompt_file

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "someone/prompts"
TRAIN_TXT = "a red fox in the snow, photographed at dawn\na sign that says \"OPEN\" on a wooden door\n"
TRAIN_JSONL = "".join(json.dumps(row) + "\n" for row in (
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}))


class Server:
    """A threaded ``http.server`` serving ``root``; ``requests`` lists the paths asked for."""

    def __init__(self, root: Path):
        self.root, self.requests = root, []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, source: fp.PromptSource, data: bytes) -> None:
        path = self.root / source.repo / source.commit / source.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path):
    served = Server(tmp_path / "served")
    yield served
    served.close()


def pinned(set_name: str, name: str, data: bytes, *, sha256: bool = True) -> fp.PromptSource:
    """A manifest entry for ``data`` with its real hashes (git blob id only, for ``sha256=False``)."""
    return fp.PromptSource(set_name, REPO, COMMIT, f"dataset/{set_name}/{name}", f"{set_name}/{name}",
                           fp.git_blob_id(len(data), [data]),
                           hashlib.sha256(data).hexdigest() if sha256 else None, len(data) if sha256 else None)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.part"))


def test_git_blob_id_is_gits():
    assert fp.git_blob_id(0, []) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git hash-object /dev/null
    assert fp.git_blob_id(6, [b"hello\n"]) == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_fetch_writes_where_the_configs_read_then_skips(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "_umask", lambda: 0o022)
    sources = [pinned("pickscore", "train.txt", TRAIN_TXT.encode()),
               pinned("geneval", "train_metadata.jsonl", TRAIN_JSONL.encode(), sha256=False)]
    for source, text in zip(sources, (TRAIN_TXT, TRAIN_JSONL)):
        server.serve(source, text.encode())
    data_dir, out = tmp_path / "data", io.StringIO()

    paths = fp.fetch(sources, data_dir, server.base_url, out=out)

    assert paths == [data_dir / "pickscore" / "train.txt", data_dir / "geneval" / "train_metadata.jsonl"]
    assert paths[0].read_text() == TRAIN_TXT and paths[1].read_text() == TRAIN_JSONL
    assert next(row["prompt"] for row in load_prompt_file(paths[0], tag="pickscore")).startswith("a red fox")
    assert load_prompt_file(paths[1])[1]["include"][0]["color"] == "red"
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "[1/2] pickscore/train.txt" in lines[0] and "sha256 ok" in lines[0]
    assert "git blob id ok" in lines[1] and hashlib.sha256(TRAIN_JSONL.encode()).hexdigest() in lines[1]
    assert server.requests == [f"/{REPO}/{COMMIT}/dataset/pickscore/train.txt",
                               f"/{REPO}/{COMMIT}/dataset/geneval/train_metadata.jsonl"]
    assert leftovers(data_dir) == [] and all(p.stat().st_mode & 0o044 == 0o044 for p in paths)  # umask 022
    assert "train.txt" in (data_dir / "pickscore" / ".gitignore").read_text().splitlines()

    out = io.StringIO()
    assert fp.fetch(sources, data_dir, server.base_url, out=out) == paths
    assert len(server.requests) == 2, "a present file with the pinned checksum is not fetched again"
    assert all("skipped" in line for line in out.getvalue().splitlines())


def test_a_corrupted_file_is_refused_and_deleted(server, tmp_path):
    source = pinned("ocr", "train.txt", TRAIN_TXT.encode())
    corrupted = TRAIN_TXT.replace("fox", "cat").encode()
    server.serve(source, corrupted)
    data_dir = tmp_path / "data"

    with pytest.raises(fp.ChecksumError) as caught:
        fp.fetch([source], data_dir, server.base_url, out=io.StringIO())

    message = str(caught.value)
    assert "ocr/train.txt" in message and source.url(server.base_url) in message
    assert source.sha256 in message and hashlib.sha256(corrupted).hexdigest() in message
    assert not (data_dir / "ocr" / "train.txt").exists() and leftovers(data_dir) == []


def test_a_corrupted_file_pinned_by_blob_id_only_is_refused(server, tmp_path):
    source = pinned("geneval", "train_metadata.jsonl", TRAIN_JSONL.encode(), sha256=False)
    server.serve(source, TRAIN_JSONL.encode()[:-1])
    with pytest.raises(fp.ChecksumError, match=f"expected git_blob {source.git_blob}"):
        fp.fetch([source], tmp_path / "data", server.base_url, out=io.StringIO())
    assert not (tmp_path / "data" / source.dest).exists() and leftovers(tmp_path / "data") == []


def test_more_bytes_than_pinned_stop_the_download(server, tmp_path):
    source = pinned("ocr", "test.txt", TRAIN_TXT.encode())
    server.serve(source, TRAIN_TXT.encode() * 3)
    with pytest.raises(fp.ChecksumError, match="more than the pinned"):
        fp.fetch([source], tmp_path / "data", server.base_url, out=io.StringIO())
    assert leftovers(tmp_path / "data") == [] and not (tmp_path / "data" / source.dest).exists()


def test_a_missing_file_names_the_url_and_how_to_place_it(server, tmp_path):
    source = pinned("pickscore", "train.txt", TRAIN_TXT.encode())  # not served: 404
    with pytest.raises(fp.PromptFetchError) as caught:
        fp.fetch([source], tmp_path / "data", server.base_url, out=io.StringIO())
    message = str(caught.value)
    assert "HTTP 404" in message and source.url(server.base_url) in message
    assert f"place it at {tmp_path / 'data' / 'pickscore' / 'train.txt'}" in message and source.sha256 in message
    assert not (tmp_path / "data" / source.dest).exists() and leftovers(tmp_path / "data") == []


def test_every_file_is_tried_and_each_failure_named(server, tmp_path):
    good, missing, corrupted = (pinned("pickscore", "train.txt", TRAIN_TXT.encode()),
                                pinned("ocr", "train.txt", b"never served\n"),
                                pinned("ocr", "test.txt", TRAIN_TXT.encode()))
    server.serve(good, TRAIN_TXT.encode())
    server.serve(corrupted, b"something else\n")
    out = io.StringIO()
    with pytest.raises(fp.PromptFetchError, match="2 of 3 files failed") as caught:
        fp.fetch([missing, good, corrupted], tmp_path / "data", server.base_url, out=out)
    assert not isinstance(caught.value, fp.ChecksumError)
    assert "- ocr/train.txt: HTTP 404" in str(caught.value) and "checksum mismatch for ocr/test.txt" in str(caught.value)
    assert (tmp_path / "data" / good.dest).read_text() == TRAIN_TXT
    assert not (tmp_path / "data" / corrupted.dest).exists() and leftovers(tmp_path / "data") == []
    assert [line.split(":")[0] for line in out.getvalue().splitlines()] == [
        "[1/3] ocr/train.txt", "[2/3] pickscore/train.txt", "[3/3] ocr/test.txt"]


def test_offline_names_the_url_and_how_to_place_it(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    source = pinned("ocr", "train.txt", TRAIN_TXT.encode())
    with pytest.raises(fp.PromptFetchError, match="cannot reach") as caught:
        fp.fetch([source], tmp_path / "data", base_url, timeout=5, out=io.StringIO())
    assert source.url(base_url) in str(caught.value) and "Offline?" in str(caught.value)
    assert "place it at" in str(caught.value)


def test_a_present_file_with_other_content_is_kept_unless_forced(server, tmp_path):
    source = pinned("ocr", "train.txt", TRAIN_TXT.encode())
    server.serve(source, TRAIN_TXT.encode())
    dest = tmp_path / "data" / source.dest
    dest.parent.mkdir(parents=True)
    dest.write_text("my own prompts\n")
    with pytest.raises(fp.ChecksumError, match="--force"):
        fp.fetch([source], tmp_path / "data", server.base_url, out=io.StringIO())
    assert dest.read_text() == "my own prompts\n" and server.requests == []
    fp.fetch([source], tmp_path / "data", server.base_url, force=True, out=io.StringIO())
    assert dest.read_text() == TRAIN_TXT


def test_the_command_line(server, tmp_path, monkeypatch, capsys):
    sources = (pinned("pickscore", "train.txt", TRAIN_TXT.encode()), pinned("ocr", "train.txt", b"missing\n"))
    server.serve(sources[0], TRAIN_TXT.encode())
    monkeypatch.setattr(fp, "SOURCES", sources)
    monkeypatch.setenv(fp.BASE_URL_ENV, server.base_url)
    data_dir = tmp_path / "data"

    assert fp.main(["--data-dir", str(data_dir), "--sets", "pickscore"]) == 0
    assert (data_dir / "pickscore" / "train.txt").read_text() == TRAIN_TXT
    assert fp.main(["--data-dir", str(data_dir), "--sets", "ocr"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ocr/train.txt: HTTP 404") and "Traceback" not in err
    assert fp.main(["--data-dir", str(data_dir), "--list"]) == 0
    assert sources[1].url(server.base_url) in capsys.readouterr().out


def test_make_prompts_passes_the_default_data_dir():
    # under `make test` the inherited MAKELEVEL/MAKEFLAGS would make this make print "Entering directory" lines
    env = {key: value for key, value in os.environ.items() if key not in ("OPD_ROOT", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run(["make", "--no-print-directory", "-n", "prompts", "ARGS=--sets ocr"], cwd=ROOT,
                          capture_output=True, text=True,
                          timeout=60, check=False, env=env)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith(".venv/bin/python -m opd.data.fetch_prompts")
    assert f'--data-dir "{ROOT}/data"' in line and line.endswith("--sets ocr")


def sd35_config_reads() -> dict[str, list[str]]:
    """``data_dir``-relative prompt files read by the SD3.5 configs → the config files reading them."""
    files = [p for p in (CONF / "experiment").glob("*.yaml") if "sd35_medium" in p.read_text()]
    files += sorted((CONF / "teacher").glob("sd35_*.yaml")) + [CONF / "eval_tasks" / "sd35.yaml"]
    reads: dict[str, list[str]] = {}
    for path in files:
        for rel in re.findall(r"\$\{paths\.data_dir\}/([^\"'\s}]+)", path.read_text()):
            reads.setdefault(rel, []).append(path.relative_to(ROOT).as_posix())
    return reads


def test_the_committed_manifest_is_well_formed_and_lands_where_the_configs_read():
    hex_of = {40: re.compile(r"[0-9a-f]{40}"), 64: re.compile(r"[0-9a-f]{64}")}
    for source in fp.SOURCES:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", source.repo), source
        assert hex_of[40].fullmatch(source.commit) and hex_of[40].fullmatch(source.git_blob), source
        assert source.path and not source.path.startswith("/") and ".." not in source.path.split("/"), source
        assert source.dest == f"{source.set}/{Path(source.path).name}", source
        if source.sha256 is not None or source.size is not None:
            assert hex_of[64].fullmatch(source.sha256) and source.size > 0, source
        assert source.url().startswith(f"https://raw.githubusercontent.com/{source.repo}/{source.commit}/")
    assert len({s.dest for s in fp.SOURCES}) == len(fp.SOURCES) and fp.SETS == ("pickscore", "ocr", "geneval")
    # the two files of 4 MiB and more are pinned by git blob id until their sha256 is added
    assert {s.dest for s in fp.SOURCES if s.sha256 is None} <= {"ocr/train.txt", "geneval/train_metadata.jsonl"}

    reads = sd35_config_reads()
    folders = {rel.split("/")[0] for rel in reads}
    for source in fp.SOURCES:
        assert source.set in folders, f"no SD3.5 config reads prompts from <data_dir>/{source.set}/"
    fetched = {s.dest for s in fp.SOURCES}
    for rel, configs in reads.items():
        if rel.split("/")[0] in fp.SETS and not (ROOT / "data" / rel).is_file():  # the repo ships the others
            assert rel in fetched, f"{configs} read <data_dir>/{rel}, which make prompts does not fetch"
    for rel in ("pickscore/train.txt", "ocr/train.txt", "ocr/test.txt", "geneval/train_metadata.jsonl"):
        assert rel in reads and rel in fetched, rel


def test_the_configs_read_the_train_files_the_teachers_and_mopd_use():
    reads = sd35_config_reads()
    assert "conf/teacher/sd35_ocr.yaml" in reads["ocr/train.txt"]
    assert "conf/experiment/teacher_aesthetic.yaml" in reads["pickscore/train.txt"]
    assert "conf/teacher/sd35_geneval.yaml" in reads["geneval/train_metadata.jsonl"]
    assert "conf/eval_tasks/sd35.yaml" in reads["ocr/test.txt"]


def test_a_source_url_quotes_its_path():
    source = replace(fp.SOURCES[0], path="dataset/a b/c.txt")
    assert source.url("http://h/") == f"http://h/{source.repo}/{source.commit}/dataset/a%20b/c.txt"
