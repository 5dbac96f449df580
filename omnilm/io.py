"""Small file helpers every writer shares: atomic writes and JSON that fails with one line."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from omnilm.errors import OmniInputError


def atomic_write(file: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `file` (named `.NAME.*.tmp`), then rename
    it over `file`: a crash leaves the old file or the new one, never half of either. The file gets
    the mode a plain open() would give it (0o666 less the umask)."""
    file = Path(file)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes its files 0600, which would hide saved weights from the user's group.
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def umask() -> int:
    """The process's umask, read from /proc where Linux shows it: os.umask can only read it by
    setting it, which another thread creating a file meanwhile would see."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def write_text(file: str | Path, text: str) -> None:
    atomic_write(file, lambda tmp: Path(tmp).write_text(text))


def write_json(file: str | Path, data: Any) -> None:
    write_text(file, json.dumps(data, indent=2) + "\n")


def write_csv(file: str | Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    """`rows` as CSV under a header of `fields`, floats to 4 decimals, written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    write_text(file, text.getvalue())


def read_json(file: str | Path) -> Any:
    file = Path(file)
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OmniInputError(f"{file} is not valid JSON ({e}); fix it, or download or save it again") from None
