"""User-supplied prompt files (one prompt per line, or GenEval-style ``*.jsonl`` metadata)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_prompt_file(path: str | Path, tag: str = "prompt") -> list[dict[str, Any]]:
    """Rows ``{"prompt", "tag", ...}`` from a ``.txt`` (a prompt per line) or ``.jsonl`` file.

    Blank lines are skipped; a missing or empty file fails with its path and what to put there.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found: give a .txt with one prompt per line or a .jsonl "
                                "with a 'prompt' key per line (set it in the experiment's prompts.path)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err})") from err
            if "prompt" not in row:
                raise ValueError(f"{path}:{number} has no 'prompt' key")
            rows.append({"tag": tag, **row})
    else:
        rows = [{"prompt": line.strip(), "tag": tag} for line in lines]
    if not rows:
        raise ValueError(f"prompt file {path} is empty")
    return rows
