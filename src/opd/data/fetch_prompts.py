"""``python -m opd.data.fetch_prompts`` (``make prompts``): the SD3.5 prompt sets, fetched and checked.

The paper's teachers were trained on Flow-GRPO's prompt sets. :data:`SOURCES` pins each file by
repository, commit and path, with its git blob id and, where known, its sha256 and size; a file is
fetched from ``<base URL>/<owner>/<repo>/<commit>/<path>`` (``raw.githubusercontent.com`` unless
``--base-url`` or ``$OPD_PROMPTS_BASE_URL`` says otherwise), checked against every pinned hash, and
written atomically to ``<data dir>/<set>/<file>``: where the SD3.5 configs read it
(``${paths.data_dir}/pickscore/train.txt`` and so on; docs/prompts.md has the table).

A file already there with the pinned hashes is skipped; one there with other content is left alone
unless ``--force``. A download whose hash differs is deleted and refused, naming the file, the URL
and both hashes. Standard library only, so it runs before anything else is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
BASE_URL_ENV = "OPD_PROMPTS_BASE_URL"
#: no prompt file here comes near this; a server sending more is not sending a prompt file
MAX_BYTES = 256 * 1024 * 1024
CHUNK = 1 << 16
#: written into each set's folder, so that downloaded files stay out of git when data_dir is in a checkout
GITIGNORE_HEADER = "# written by python -m opd.data.fetch_prompts: the downloaded prompt files stay out of git\n"

FLOW_GRPO = "yifan123/flow_grpo"
#: Flow-GRPO's main branch on 2025-07-18 ("fix imagereward"); the dataset/ files are unchanged since
#: its first commit (39d3d2c, 2025-05-08)
FLOW_GRPO_COMMIT = "ac4c86e8cae021841f1fde853d340e0db67690dd"


@dataclass(frozen=True)
class PromptSource:
    """One pinned file: where it comes from, where it goes (relative to data_dir), what it must hash to.

    ``git_blob`` is git's object id of the file (sha1 of ``b"blob <size>\\0" + content``), which the
    pinned commit's tree fixes; ``sha256`` and ``size`` are checked too where they are known.
    """

    set: str
    repo: str
    commit: str
    path: str
    dest: str
    git_blob: str
    sha256: str | None = None
    size: int | None = None

    def url(self, base_url: str = DEFAULT_BASE_URL) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{urllib.parse.quote(self.path)}"


def _flow_grpo(set_name: str, name: str, git_blob: str, sha256: str | None = None,
               size: int | None = None) -> PromptSource:
    return PromptSource(set_name, FLOW_GRPO, FLOW_GRPO_COMMIT, f"dataset/{set_name}/{name}", f"{set_name}/{name}",
                        git_blob, sha256, size)


#: The committed manifest. ``ocr/train.txt`` and ``geneval/train_metadata.jsonl`` are pinned by their
#: git blob id alone: their sha256 and size were not computed when this table was written (a run
#: prints both for each file it checks by blob id only, to be added here).
SOURCES: tuple[PromptSource, ...] = (
    # Pick-a-Pic v1 captions with at least 5 spaces, deduplicated, shuffled; the first 2048 are test
    _flow_grpo("pickscore", "train.txt", "a437bd921c03fbc00c4e7ce148ae2d28fcd6e49b",
               "2f425adcbb9a6d0feee7c6c448e1cb83a1f71deca9434b803907e2578eca837f", 2906730),
    _flow_grpo("pickscore", "test.txt", "45f05231b969fb5f74c8debd606b22cd3be27f8e",
               "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262", 239891),
    # prompts asking for text in the image (the text in double quotes)
    _flow_grpo("ocr", "train.txt", "3ce0521b77b0a9031191d66ecc36ebaaf27a3922"),
    _flow_grpo("ocr", "test.txt", "8deb4f8d8f2e863f45353354243669b3c991a6a2",
               "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc", 217565),
    # GenEval-format metadata: one JSON object per line (prompt, tag, include, exclude)
    _flow_grpo("geneval", "train_metadata.jsonl", "0b97e8a6802c08fc7537cd00c76ae79c851bddcb"),
    _flow_grpo("geneval", "test_metadata.jsonl", "27cdaf5cc1356fe15aeadbb8df55682ca74228f0",
               "cec4b24b9fee7bac21c8f787054ecc8dc9ff831674037713a4cd35e0f0a74a28", 340835),
)
SETS: tuple[str, ...] = tuple(dict.fromkeys(source.set for source in SOURCES))


class PromptFetchError(RuntimeError):
    """A file could not be fetched (unreachable, HTTP error) or is not the pinned one."""


class ChecksumError(PromptFetchError):
    """A downloaded or present file's size or hash is not the pinned one."""


def default_data_dir() -> Path:
    """``paths.data_dir``'s default (conf/paths/default.yaml): ``<root>/data`` with root ``$OPD_ROOT``,
    else the checkout (``conf/`` beside ``src/``), else the working folder."""
    if os.environ.get("OPD_ROOT"):
        return Path(os.environ["OPD_ROOT"]) / "data"
    from opd.utils.paths import checkout_root

    root = checkout_root()
    return (root if (root / "conf").is_dir() else Path.cwd()) / "data"


def git_blob_id(data_size: int, chunks: Iterable[bytes]) -> str:
    """git's object id of a file of ``data_size`` bytes given as ``chunks``."""
    digest = hashlib.sha1(f"blob {data_size}\0".encode())  # git's object naming, not a security use
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _read_chunks(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            yield chunk


def digests(path: Path) -> dict[str, object]:
    """``{"size", "sha256", "git_blob"}`` of a file."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    for chunk in _read_chunks(path):
        sha256.update(chunk)
    return {"size": size, "sha256": sha256.hexdigest(), "git_blob": git_blob_id(size, _read_chunks(path))}


def mismatches(source: PromptSource, got: dict[str, object]) -> list[tuple[str, object, object]]:
    """``(what, expected, got)`` for every pinned value the file's ``got`` digests differ from."""
    return [(key, expected, got[key]) for key in ("size", "sha256", "git_blob")
            if (expected := getattr(source, key)) is not None and got[key] != expected]


def _describe(found: list[tuple[str, object, object]]) -> str:
    return "; ".join(f"expected {key} {expected}, got {value}" for key, expected, value in found)


def _by_hand(source: PromptSource, dest: Path) -> str:
    pinned = f"sha256 {source.sha256}" if source.sha256 else f"git blob id {source.git_blob}"
    return (f"To place it by hand, download {source.url()} on a machine that can reach it and place it at {dest} ({pinned}; "
            f"it is {source.path} of github.com/{source.repo} at commit {source.commit}), then run this again "
            f"to check it; or point --base-url / ${BASE_URL_ENV} at a mirror laid out as <owner>/<repo>/<commit>/<path>.")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _human(size: int) -> str:
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def _download(source: PromptSource, url: str, dest: Path, timeout: float) -> tuple[Path, int]:
    """The file at ``url`` in a temporary file beside ``dest`` (removed again on any failure), and its size."""
    limit = source.size if source.size is not None else MAX_BYTES
    request = urllib.request.Request(url, headers={"User-Agent": "opd-fetch-prompts"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise PromptFetchError(f"{source.dest}: HTTP {err.code} ({err.reason}) for {url}. "
                               + _by_hand(source, dest)) from err
    except (urllib.error.URLError, OSError) as err:
        raise PromptFetchError(f"{source.dest}: cannot reach {url} ({getattr(err, 'reason', err)}). Offline? "
                               + _by_hand(source, dest)) from err
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except BaseException:
        response.close()
        raise
    tmp = Path(tmp_name)
    received = 0
    try:
        with response, os.fdopen(fd, "wb") as out:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as err:
                    raise PromptFetchError(f"{source.dest}: the transfer from {url} broke after {received} bytes "
                                           f"({err!r}); the partial file was deleted. " + _by_hand(source, dest)) from err
                if not chunk:
                    break
                received += len(chunk)
                if received > limit:
                    raise ChecksumError(f"{source.dest}: {url} sent more than the pinned {limit} bytes "
                                        "(not the pinned file); the partial file was deleted")
                out.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, received


def _write_gitignore(folder: Path, names: Sequence[str]) -> None:
    """List ``names`` (and the file itself) in ``folder/.gitignore``, keeping what is listed there."""
    path = folder / ".gitignore"
    lines = path.read_text().splitlines() if path.is_file() else [GITIGNORE_HEADER.rstrip("\n")]
    wanted = [name for name in (".gitignore", *names) if name not in lines]
    if wanted:
        path.write_text("\n".join([*lines, *wanted]) + "\n")


def fetch_one(source: PromptSource, data_dir: Path, base_url: str, *, force: bool = False, timeout: float = 60.0,
              log=print) -> Path:
    """Fetch and check one file into ``data_dir``; its path. ``log(text, end=...)`` gets the progress."""
    dest = data_dir / source.dest
    url = source.url(base_url)
    if dest.is_file():
        found = mismatches(source, digests(dest))
        if not found:
            log(f"present at {dest}, checksum ok: skipped")
            _write_gitignore(dest.parent, [dest.name])
            return dest
        if not force:
            log("present but not the pinned file")
            raise ChecksumError(f"{source.dest}: {dest} is there but is not the pinned file ({_describe(found)}); "
                                f"move it away, or pass --force to replace it with {url}")
        log(f"{dest} is not the pinned file ({_describe(found)}): replacing it; ", end="")
    log(f"fetching {url} ... ", end="")
    try:
        tmp, received = _download(source, url, dest, timeout)
    except BaseException:
        log("failed")
        raise
    log(_human(received), end=", ")
    try:
        got = digests(tmp)
        found = mismatches(source, got)
        if found:
            raise ChecksumError(f"checksum mismatch for {source.dest} from {url}: {_describe(found)}. "
                                "The download was deleted; the server is not serving the pinned file "
                                f"({source.path} of {source.repo} at {source.commit}).")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private; the others are not
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        log("failed, download deleted")
        raise
    if source.sha256 is None:
        log(f"git blob id ok (to pin it further: sha256 {got['sha256']}, size {got['size']})")
    else:
        log("sha256 ok")
    _write_gitignore(dest.parent, [dest.name])
    return dest


def fetch(sources: Sequence[PromptSource], data_dir: str | Path, base_url: str | None = None, *,
          force: bool = False, timeout: float = 60.0, out=None) -> list[Path]:
    """Fetch and check ``sources`` into ``data_dir``; the destination paths, in order.

    Every file is tried; then a failure raises :class:`ChecksumError` (a download, deleted, or a present
    file, kept unless ``force``, that is not the pinned one) or :class:`PromptFetchError` (a server that
    cannot be reached or answers with an error; a mix of both), naming each file that failed. One
    progress line per file goes to ``out`` (stdout by default).
    """
    out = sys.stdout if out is None else out
    base_url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    data_dir = Path(data_dir).expanduser()

    def log(text: str, end: str = "\n") -> None:
        print(text, end=end, file=out, flush=True)

    done, errors = [], []
    for number, source in enumerate(sources, 1):
        log(f"[{number}/{len(sources)}] {source.dest}: ", end="")
        try:
            done.append(fetch_one(source, data_dir, base_url, force=force, timeout=timeout, log=log))
        except PromptFetchError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        kind = ChecksumError if all(isinstance(err, ChecksumError) for err in errors) else PromptFetchError
        raise kind(f"{len(errors)} of {len(sources)} files failed:\n" + "\n".join(f"- {err}" for err in errors))
    return done


def select(sets: Iterable[str] | None, sources: Sequence[PromptSource] | None = None) -> list[PromptSource]:
    """The sources of the named sets (all of them for ``None``) in :data:`SOURCES` (or ``sources``), in order."""
    sources = SOURCES if sources is None else sources
    if sets is None:
        return list(sources)
    wanted = list(sets)
    unknown = sorted(set(wanted) - {source.set for source in sources})
    if unknown:
        raise ValueError(f"unknown prompt set(s) {unknown}; known: {sorted({source.set for source in sources})}")
    return [source for source in sources if source.set in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.data.fetch_prompts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="paths.data_dir (default: $OPD_ROOT/data, else <checkout>/data)")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=None, metavar="SET",
                        help=f"which sets (default: all of {' '.join(SETS)})")
    parser.add_argument("--base-url", default=None,
                        help=f"serve <owner>/<repo>/<commit>/<path> from here (default: ${BASE_URL_ENV}, else {DEFAULT_BASE_URL})")
    parser.add_argument("--force", action="store_true", help="replace present files that are not the pinned ones")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait on the server (default 60)")
    parser.add_argument("--list", action="store_true", help="print the pinned files and their URLs, fetch nothing")
    args = parser.parse_args(argv)
    sources = select(args.sets)
    base_url = args.base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    if args.list:
        for source in sources:
            pinned = f"sha256 {source.sha256}" if source.sha256 else f"git blob {source.git_blob}"
            print(f"{data_dir / source.dest}  <-  {source.url(base_url)}  ({pinned})")
        return 0
    try:
        paths = fetch(sources, data_dir, base_url, force=args.force, timeout=args.timeout)
    except PromptFetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"prompts: {len(paths)} file(s) under {data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
