"""The embedded default corpus: the Python standard library's own top-level source files.

It is real text written by many people over decades, present on every machine that runs this package,
so the main job needs no download. Documents are the ``*.py`` files directly inside the interpreter's
stdlib folder (``sysconfig.get_paths()["stdlib"]``), sorted by file name; on CPython 3.11.7 that is
168 files, 4.7 MB. Other Python versions give slightly different text, so figures quoted in the README
name the version they were measured on.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_documents(max_documents: int | None = None) -> list[dict[str, str]]:
    """Return [{"name": file name, "text": source}] in the documented fixed order."""
    files = sorted(stdlib_folder().glob("*.py"), key=lambda p: p.name)
    if max_documents is not None:
        files = files[:max_documents]
    docs = []
    for f in files:
        try:
            docs.append({"name": f.name, "text": f.read_text(encoding="utf-8")})
        except (UnicodeDecodeError, OSError):
            continue  # a stray non-UTF-8 or unreadable file is skipped the same way everywhere
    return docs
