"""Turn workload rows into a markdown report: the machine, the date, the command, tables and notes."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: The sign after a ratio (1.02 times), spelled out so no one mistakes it for the letter x in the source.
TIMES = "\N{MULTIPLICATION SIGN}"


@dataclass(frozen=True)
class Column:
    """One table column: the row key it shows, its heading, and how a value is written."""

    key: str
    heading: str
    format: Callable[[object], str] = str
    align: str = "right"


@dataclass(frozen=True)
class Section:
    """What one workload hands the report: a title, its rows as dicts, and notes for the reader."""

    title: str
    columns: Sequence[Column]
    rows: Sequence[dict]
    notes: Sequence[str] = field(default_factory=tuple)
    #: A chart to show under the title: a path relative to the markdown file.
    image: str = ""


def number(digits: int = 0, suffix: str = "") -> Callable[[object], str]:
    """Format a number with thousands separators; ``None`` (not measured) becomes a dash."""

    def format(value: object) -> str:
        if value is None:
            return "—"
        return f"{value:,.{digits}f}{suffix}"

    return format


def ratio(value: object) -> str:
    return "—" if value is None else f"{value:.2f}{TIMES}"


def markdownTable(columns: Sequence[Column], rows: Sequence[dict]) -> str:
    header = "| " + " | ".join(c.heading for c in columns) + " |"
    rule = "|" + "|".join("---:" if c.align == "right" else ":---" for c in columns) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(c.format(row.get(c.key)) for c in columns) + " |")
    return "\n".join(lines)


def cpuModel() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machineInfo() -> dict[str, str]:
    """What a reader needs to judge the figures: CPUs, OS, interpreter, Twisted, load."""
    try:
        import twisted

        twistedVersion = twisted.__version__
    except ImportError:
        twistedVersion = "not installed"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return {
        "CPUs": f"{os.cpu_count()} {TIMES} {cpuModel()}",
        "OS": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "Python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "Twisted": twistedVersion,
        "Load average at start (1, 5, 15 min)": load,
    }


def commandLine(argv: Sequence[str]) -> str:
    return "python -m bench " + shlex.join(argv)


def render(
    title: str,
    argv: Sequence[str],
    machine: dict[str, str],
    sections: Sequence[Section],
    extra: Sequence[str] = (),
    started: datetime.datetime | None = None,
) -> str:
    """The report: a title, the date, the command, the machine (and ``extra`` lines), then each section's
    chart, table and notes."""
    now = started or datetime.datetime.now(datetime.timezone.utc).astimezone()
    lines = [f"## {title}", "", f"- Date: {now:%Y-%m-%d %H:%M %Z}", f"- Command: `{commandLine(argv)}`"]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    lines += [f"- {line}" for line in extra]
    for section in sections:
        lines += ["", f"### {section.title}", ""]
        if section.image:
            lines += [f"![{section.title}]({section.image})", ""]
        if section.rows:
            lines.append(markdownTable(section.columns, section.rows))
        if section.notes:
            if section.rows:
                lines.append("")
            lines += [f"- {note}" for note in section.notes]
    return "\n".join(lines) + "\n"
