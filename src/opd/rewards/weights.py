"""Where real-scale weights come from: never silently random.

A reward or evaluation model names its weights by a *source*: a local path, a name relative to the
weights directory, or a Hugging Face hub id. :func:`resolve_weights` turns it into a local path or
fails at once with a message that names the source and says how to provide it. Nothing here
downloads: users fetch weights once (``huggingface-cli download <id> --local-dir <dir>/<id>``) and
point opd at the folder with ``paths.weights_dir=<dir>`` or ``export OPD_WEIGHTS_DIR=<dir>``.
"""
from __future__ import annotations

import os
from pathlib import Path

#: environment variable naming the folder that holds downloaded weights (``<dir>/<hub id>/...``)
WEIGHTS_ENV = "OPD_WEIGHTS_DIR"


class MissingWeightsError(FileNotFoundError):
    """The weights a component needs are not on this machine (the message says how to fix it)."""


def weights_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The weights folder: ``explicit`` if given, else ``$OPD_WEIGHTS_DIR``, else ``None``."""
    value = explicit if explicit not in (None, "") else os.environ.get(WEIGHTS_ENV)
    return Path(value).expanduser() if value else None


def _hub_cache(source: str, filename: str | None) -> Path | None:
    """``source`` as already present in the local Hugging Face cache (no network), else ``None``."""
    if source.count("/") != 1 or source.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        return None
    try:
        if filename is not None:
            return Path(hf_hub_download(source, filename, local_files_only=True))
        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 — not cached (or a malformed id): the caller reports it
        return None


def resolve_weights(source: str | os.PathLike, *, what: str, filename: str | None = None,
                    root: str | os.PathLike | None = None) -> Path:
    """A local path for ``source`` (a folder, or ``filename`` inside it when given).

    Looked up, in order: ``source`` as a path; ``<weights dir>/<source>`` (``root``, else
    ``$OPD_WEIGHTS_DIR``); the local Hugging Face cache for a hub id. ``what`` names the component in
    the error (e.g. ``"PickScore reward"``).

    Raises:
        MissingWeightsError: nothing found; the message lists where it looked and how to provide it.
    """
    source = str(source)
    tried: list[Path] = []
    candidates = [Path(source).expanduser()]
    base = weights_dir(root)
    if base is not None and not Path(source).is_absolute():
        candidates.append(base / source)
    for folder in candidates:
        path = folder / filename if filename is not None and folder.is_dir() else folder
        tried.append(path)
        if path.exists():
            return path
    cached = _hub_cache(source, filename)
    if cached is not None and cached.exists():
        return cached
    where = ", ".join(str(p) for p in tried)
    fetch = f"huggingface-cli download {source} --local-dir <dir>/{source}" if source.count("/") == 1 \
        else f"copy the weights to <dir>/{source}"
    raise MissingWeightsError(
        f"{what}: weights {source!r}{f' (file {filename!r})' if filename else ''} not found "
        f"(looked at: {where}; not in the local Hugging Face cache). Fetch them once on a machine with "
        f"network access ({fetch}), then point opd at the folder with `paths.weights_dir=<dir>` or "
        f"`export {WEIGHTS_ENV}=<dir>`. opd never falls back to random weights."
    )
