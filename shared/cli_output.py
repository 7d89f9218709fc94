"""Output conventions shared by every `landmarks` subcommand: `--json` prints one JSON object last."""

from __future__ import annotations

import json
from typing import Annotated

import typer

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]


def emit(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, default=str))
        return
    for key, value in obj.items():
        print(f"{key}: {value if not isinstance(value, (dict, list)) else json.dumps(value, default=str)}")
