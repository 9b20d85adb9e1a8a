"""`farm submit program.md`: submit a research program through the REST API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.client import Api
from cli.errors import CLIError


def _json_option(value: str | None, name: str) -> dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise CLIError(f"--{name} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise CLIError(f"--{name} must be a JSON object")
    return parsed


def default_name(path: Path, text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()[:200]
    return path.stem


def submit(
    program: Annotated[Path, typer.Argument(help="The research program (markdown)", exists=True, dir_okay=False,
                                            readable=True)],
    name: Annotated[str | None, typer.Option(help="Name (default: the first '# ' heading or the file name)")] = None,
    profile: Annotated[str, typer.Option(help="Hardware profile: cpu or h100")] = "cpu",
    time_budget: Annotated[float | None, typer.Option(help="Training seconds per run")] = None,
    hw_class: Annotated[str | None, typer.Option(help="Queue / hardware class, e.g. gpu.h100")] = None,
    editable: Annotated[list[str] | None, typer.Option(help="Editable file (repeatable; default train.py)")] = None,
    proposer: Annotated[str | None, typer.Option(help='Proposer config, JSON: {"model": "openai/gpt-4o"}')] = None,
    policy: Annotated[str | None, typer.Option(help='Policy config, JSON: {"kind": "confirm", "k_sigma": 2}')] = None,
    stop_rules: Annotated[str | None, typer.Option(help='Stop rules, JSON: {"max_experiments": 100}')] = None,
    weight: Annotated[float, typer.Option(help="Share of the farm relative to other programs")] = 1.0,
) -> None:
    """Submit PROGRAM (markdown) to the farm through the REST API."""
    try:
        text = program.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(f"{program} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    body: dict[str, Any] = {
        "name": name or default_name(program, text), "instructions": text, "profile": profile, "weight": weight,
        "proposer": _json_option(proposer, "proposer"), "policy": _json_option(policy, "policy"),
        "stop_rules": _json_option(stop_rules, "stop-rules")}
    if time_budget is not None:
        body["time_budget"] = time_budget
    if hw_class:
        body["hw_class"] = hw_class
    if editable:
        body["editable_files"] = editable
    with Api() as api:
        created = api.post("/programs", json=body)
        typer.echo(f"submitted program {created['id']} ({created['slug']}): branch {created['branch']}, "
                   f"{created['time_budget']:g}s budget on {created['hw_class']}")
        typer.echo(f"dashboard: {api.url}/ui/programs/{created['id']}")
