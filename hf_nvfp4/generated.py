"""Generated blocks in Markdown pages: a command rewrites its own block between two marker lines and
keeps what a person wrote around it (``hf-nvfp4 ablate``, ``hf-nvfp4 diagnose``).

>>> markers("ablate")[0]
'<!-- hf-nvfp4 ablate: generated below -->'
"""

from __future__ import annotations

from pathlib import Path


def markers(command: str) -> tuple[str, str]:
    """The two marker lines of ``hf-nvfp4 COMMAND``'s generated block."""
    return f"<!-- hf-nvfp4 {command}: generated below -->", f"<!-- hf-nvfp4 {command}: generated above -->"


def write_generated(path: Path, body: str, command: str, legacy_prefix: str | None = None) -> None:
    """Write ``body`` as the generated block of ``path``; refuse a page without the markers.

    ``legacy_prefix``: a page starting with it was written whole by an earlier version of the
    command, so it is replaced whole.
    """
    begin, end = markers(command)
    block = f"{begin}\n\n{body}\n\n{end}\n"
    if not path.exists():
        path.write_text(block)
        return
    text = path.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        path.write_text(head + block + rest.split(end, 1)[1].lstrip("\n"))
    elif legacy_prefix is not None and text.startswith(legacy_prefix):
        path.write_text(block)
    else:
        raise ValueError(
            f"{path} exists and was not written by hf-nvfp4 {command}; add the lines {begin!r} and {end!r} "
            "where the generated part should go, or choose another --out"
        )
