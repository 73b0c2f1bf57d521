"""Writes a benchmark's figures into its own section of docs/results.md (each bench's ``--record``).

A bench owns the text between ``<!-- BEGIN bench/<name>.py -->`` and ``<!-- END bench/<name>.py -->``;
an invocation whose options change what is measured owns its own section, the options written after
the script's name (``<!-- BEGIN bench/features.py --reads -->``). Recording replaces that section with
the date, the machine and the rows just measured, creates it at the end of the file when it is
missing, and leaves every other byte of the file as it was.

Standard library only: every bench imports it, and a bench may import nothing but torch, h5py,
numpy and open_clip besides ltpipe.
"""

import datetime
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Optional, Sequence

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def section_key(script: str, options: str = "") -> str:
    """``bench/<name>.py``, followed by the options that select what the run measures, if any."""
    key = f"bench/{Path(script).name}"
    return f"{key} {options}" if options else key


def markers(key: str) -> tuple:
    return f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> str:
    """The names of the NVIDIA GPUs ``nvidia-smi`` lists; empty without a driver."""
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return ", ".join(line.strip() for line in out.splitlines() if line.strip())


def machine() -> str:
    """One line: cores this process may use, the CPU model, the GPUs or "no GPU"."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = _gpus()
    return f"{cores} cores ({_cpu_model()}), {'GPU: ' + gpus if gpus else 'no GPU'}"


def _cell(value) -> str:
    # A table cell cannot hold a pipe or a line break.
    return str(value).replace("|", "\\|").replace("\n", " ")


def section(key: str, command: str, rows: Iterable[Sequence], header: Sequence[str] = ("what", "result"),
            note: str = "", when: Optional[datetime.date] = None, where: Optional[str] = None) -> str:
    """The section's text, markers included: date and machine, ``note``, then the rows as a Markdown table."""
    begin, end = markers(key)
    when = when or datetime.date.today()
    measured = f"Measured {when.isoformat()} with `{command}`; {where or machine()}."
    lines = [begin, f"{measured} {note}" if note else measured, "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    lines.append(end)
    return "\n".join(lines)


def replace_section(text: str, key: str, block: str) -> str:
    """``text`` with the section ``key`` replaced by ``block``, or, when there is none, with a heading
    and ``block`` appended at the end. Nothing outside the section changes."""
    begin, end = markers(key)
    start = text.find(begin)
    if start < 0:
        separator = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return f"{text}{separator}## {key}\n\n{block}\n"
    stop = text.find(end, start)
    if stop < 0:
        raise ValueError(f"{begin} has no matching {end}: fix the markers by hand before recording")
    return text[:start] + block + text[stop + len(end):]


def record(key: str, command: str, rows: Iterable[Sequence], header: Sequence[str] = ("what", "result"),
           note: str = "", path: Optional[Path] = None) -> None:
    """Replace (or add) section ``key`` of ``path`` (docs/results.md) with ``rows``; the file is replaced
    atomically."""
    path = Path(path or RESULTS)
    text = "# Measured figures\n"
    if path.exists():
        with open(path, encoding="utf-8", newline="") as fh:  # newline="": line ends kept as they are
            text = fh.read()
    updated = replace_section(text, key, section(key, command, rows, header, note))
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8", newline="") as fh:
        fh.write(updated)
    os.replace(partial, path)
    print(f"recorded in {path}: {key}")
