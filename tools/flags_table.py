"""Print train.py's flags as the markdown table in README.md (regenerate after changing flags).

    python tools/flags_table.py
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from engine.config import TrainConfig  # noqa: E402


def flags_table() -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    lines = []
    for group in train.get_args_parser()._action_groups[2:]:
        lines += [f"**{group.title}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for action in group._group_actions:
            if action.help == argparse.SUPPRESS:
                continue
            default = "per dataset" if action.dest == "model" else defaults.get(action.dest)
            if isinstance(default, tuple):
                default = ",".join(map(str, default))
            shown = "–" if default in (None, "") else f"`{default}`"
            flags = ", ".join(f"`{o}`" for o in action.option_strings)
            lines.append(f"| {flags} | {shown} | {(action.help or '').replace('%%', '%').replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(flags_table(), end="")
