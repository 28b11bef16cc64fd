"""Results: each figure beside its baseline from the same run, as a table and as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One figure: ours, the baseline measured in the same run, their ratio, and the target."""

    figure: str
    ours: float | str | None
    baseline: float | str | None = None
    unit: str = ""
    target: str = ""
    met: bool | None = None
    digits: int = 2

    @property
    def ratio(self) -> float | None:
        if isinstance(self.ours, (int, float)) and isinstance(self.baseline, (int, float)) and self.baseline:
            return float(self.ours) / float(self.baseline)
        return None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        return data


@dataclass
class Part:
    key: str
    title: str
    baseline: str
    """What the baseline column is."""
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def from_dict(cls, key: str, data: dict[str, Any]) -> Part:
        """A part read back from the JSON results (to render them again)."""
        rows = [
            Row(
                item["figure"],
                item["ours"],
                item["baseline"],
                item["unit"],
                item["target"],
                item["met"],
                digits=item.get("digits", _digits(item["ours"], item["baseline"])),
            )
            for item in data["rows"]
        ]
        return cls(key, data["title"], data["baseline"], rows, data["notes"], data["raw"], data["error"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "baseline": self.baseline,
            "rows": [row.as_dict() for row in self.rows],
            "notes": self.notes,
            "raw": self.raw,
            "error": self.error,
        }


def _digits(*values: object) -> int:
    """Decimals for figures read back from JSON: whole numbers stay whole."""
    numbers = [value for value in values if isinstance(value, (int, float))]
    return 0 if numbers and all(abs(number) >= 100 for number in numbers) else 2


def _cell(value: float | str | None, digits: int, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".strip()


def render_part(part: Part) -> str:
    lines = [f"({part.key}) {part.title}", f"    baseline: {part.baseline}"]
    if part.error:
        lines.append(f"    NOT MEASURED: {part.error}")
    header = ("figure", "ours", "baseline", "ours/base", "target", "met")
    table = [header]
    for row in part.rows:
        met = "-" if row.met is None else ("yes" if row.met else "NO")
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
        table.append(
            (
                row.figure,
                _cell(row.ours, row.digits, row.unit),
                _cell(row.baseline, row.digits, row.unit),
                ratio,
                row.target or "-",
                met,
            )
        )
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    for index, line in enumerate(table):
        cells = [
            line[column].ljust(widths[column]) if column == 0 else line[column].rjust(widths[column])
            for column in range(len(header))
        ]
        lines.append("    " + "  ".join(cells).rstrip())
        if index == 0:
            lines.append("    " + "  ".join("-" * width for width in widths))
    lines += [f"    note: {note}" for note in part.notes]
    return "\n".join(lines)


def render_markdown(part: Part) -> str:
    """The same table in Markdown, for docs/BENCHMARKS.md."""
    lines = [
        f"**({part.key}) {part.title}** — baseline: {part.baseline}",
        "",
        "| figure | ours | baseline | ours/baseline | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in part.rows:
        met = "-" if row.met is None else ("yes" if row.met else "**no**")
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
        figure = "↳ " + row.figure.strip() if row.figure.startswith("  ") else row.figure
        lines.append(
            f"| {figure} | {_cell(row.ours, row.digits, row.unit)} | {_cell(row.baseline, row.digits, row.unit)} "
            f"| {ratio} | {row.target or '-'} | {met} |"
        )
    if part.error:
        lines.append(f"\nNot measured: {part.error}")
    if part.notes:
        lines.append("")
        lines += [f"- {note}" for note in part.notes]
    return "\n".join(lines)


def render_machine(machine: dict[str, Any]) -> str:
    order = (
        ("cpu", "CPU"),
        ("nproc", "cores (nproc)"),
        ("memory_gib", "memory (GiB)"),
        ("os", "OS"),
        ("kernel", "kernel"),
        ("python", "Python"),
        ("redis", "Redis"),
        ("mariadb", "MariaDB"),
        ("origin", "origin"),
        ("curl", "curl"),
        ("rq", "rq"),
        ("git_commit", "commit"),
    )
    width = max(len(label) for _, label in order)
    lines = ["machine"]
    for key, label in order:
        if key in machine:
            value = machine[key]
            if key == "git_commit" and machine.get("git_dirty"):
                value = f"{value} (with uncommitted changes)"
            lines.append(f"    {label.ljust(width)}  {value}")
    return "\n".join(lines)


def render_machine_markdown(machine: dict[str, Any]) -> str:
    rows = [
        ("CPU", f"{machine.get('cpu')} x {machine.get('nproc')} (nproc)"),
        ("memory", f"{machine.get('memory_gib')} GiB"),
        ("OS, kernel", f"{machine.get('os')}, {machine.get('kernel')}"),
        ("Python, rq", f"{machine.get('python')}, rq {machine.get('rq')}"),
        ("Redis", machine.get("redis")),
        ("MariaDB", machine.get("mariadb")),
        ("origin", machine.get("origin")),
        ("curl", (machine.get("curl") or "").split(" (")[0]),
        ("commit", f"{machine.get('git_commit')}{' (with uncommitted changes)' if machine.get('git_dirty') else ''}"),
    ]
    return "\n".join(["| machine | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    temp.replace(path)
