"""User-supplied prompt files (one prompt per line, or GenEval-style ``*.jsonl`` metadata)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: no text encoder here reads more (the mini model 96 bytes, CLIP 77 tokens, T5 at most 512 tokens): a
#: longer "prompt" is a file that is not one prompt per line, or text that would be silently cut
MAX_PROMPT_CHARS = 2000


def load_prompt_file(path: str | Path, tag: str = "prompt") -> list[dict[str, Any]]:
    """Rows ``{"prompt", "tag", ...}`` from a ``.txt`` (a prompt per line) or ``.jsonl`` file.

    Blank lines are skipped; a missing or empty file, a row without prompt text and a prompt longer
    than :data:`MAX_PROMPT_CHARS` fail with the path, the line and what to put there.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found: give a .txt with one prompt per line or a .jsonl "
                                "with a 'prompt' key per line (set it in the experiment's prompts.path)")
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for number, line in lines:
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err})") from err
            if not isinstance(row, dict) or "prompt" not in row:
                raise ValueError(f"{path}:{number} has no 'prompt' key")
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise ValueError(f"{path}:{number}: 'prompt' must be non-empty text, got {row['prompt']!r}")
            row = {"tag": tag, **row}
        else:
            row = {"prompt": line.strip(), "tag": tag}
        if len(row["prompt"]) > MAX_PROMPT_CHARS:
            raise ValueError(f"{path}:{number}: a prompt of {len(row['prompt'])} characters, more than any text encoder "
                             f"here reads (limit {MAX_PROMPT_CHARS}; the mini model reads 96 bytes (the v1 base 48), CLIP 77 tokens): "
                             "is the file one prompt per line?")
        rows.append(row)
    if not rows:
        raise ValueError(f"prompt file {path} is empty")
    return rows
