"""The README is part of the product: its set-up commands and flag table must stay true."""
from __future__ import annotations

import re
from pathlib import Path

import train

ROOT = Path(__file__).resolve().parents[1]


def test_every_train_flag_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    for action in train.get_args_parser()._actions:
        if action.help == "==SUPPRESS==" or not action.option_strings or "-h" in action.option_strings:
            continue
        assert f"`{action.option_strings[-1]}`" in readme, action.option_strings


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"pip install -r requirements.txt && (python -m pytest[^\n#]*)", readme).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
