"""Recipes stay runnable: every YAML parses into the configs, every file a README names exists, and every flag a
README command passes is one its program accepts."""

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hf_clipsel.parser import parse_config

REPO = Path(__file__).resolve().parents[1]
READMES = [REPO / "README.md", REPO / "recipes" / "README.md"]
RECIPES = sorted((REPO / "recipes").glob("*/select.yaml"))


def _commands(readme: Path) -> list[list[str]]:
    """Shell commands of the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"(?:^|\s)#", line)[0].strip()
            if line:
                commands.append(shlex.split(line))
    return commands


def _program(command: list[str]) -> tuple[list[str], list[str]] | None:
    """(how to ask the program for --help, its arguments), past `accelerate launch` and its own flags."""
    if command[:2] == ["accelerate", "launch"]:
        if "-m" in command:
            at = command.index("-m")
            return [sys.executable, "-m", command[at + 1], command[at + 2]], command[at + 3 :]
        script = next(i for i, word in enumerate(command) if word.endswith(".py"))
        return [sys.executable, command[script]], command[script + 1 :]
    if command[0] == "hf-clipsel":
        return [sys.executable, "-m", "hf_clipsel.cli", command[1]], command[2:]
    if command[:2] == ["python", "-m"]:
        return [sys.executable, "-m", command[2]], command[3:]
    if command[0] == "python" and command[1].endswith(".py") and (REPO / command[1]).is_file():
        return [sys.executable, command[1]], command[2:]
    return None  # pip, pytest, timm's train.py: not ours


@functools.cache
def _help(program: tuple[str, ...]) -> str:
    result = subprocess.run([*program, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name)
def test_every_recipe_parses_with_no_unknown_key(recipe):
    config = parse_config(["--config", str(recipe)])
    assert config.data.dataset_name and config.model.model_name_or_path


def test_the_paper_datasets_have_recipes():
    assert {p.parent.name for p in RECIPES} == {"cifar10", "cifar100", "tiny_imagenet", "imagenet1k"}


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_file_a_readme_names_exists(readme):
    named = set(
        re.findall(
            r"(?<![\w./-])((?:recipes|tests|hf_clipsel|model_cards)/[\w./-]+\.(?:py|yaml|md))", readme.read_text()
        )
    )
    assert named, "the README names no file?"
    missing = sorted(name for name in named if not (REPO / name).exists())
    assert not missing, f"{readme.name} names files that do not exist: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_flag_a_readme_command_passes_is_accepted(readme):
    checked = 0
    for command in _commands(readme):
        parsed = _program(command)
        if parsed is None:
            continue
        program, arguments = parsed
        help_text = _help(tuple(program))
        for flag in (word.split("=")[0] for word in arguments if word.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", help_text), f"{' '.join(command)}: {flag} is not accepted"
        checked += 1
    assert checked, "no command checked"
