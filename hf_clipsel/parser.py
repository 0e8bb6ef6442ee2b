"""`--config FILE` plus CLI overrides, with TRL's TrlParser semantics: the YAML file sets the defaults, flags on
the command line win, and a YAML key that names no field is an error (a typo must not be silently ignored).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .configs import PRESETS, ClipselConfig, flag_classes
from .outputs import RUN_RECORD_KEYS


def build_parser(**kwargs) -> HfArgumentParser:
    # the selectors' own options are flags too (those of plugins as well: the registry loads them on first use)
    parser = HfArgumentParser(flag_classes(), **kwargs)
    parser.add_argument("--config", type=str, default=None, help="YAML file of field: value pairs; flags override it.")
    for action in parser._actions:  # HfArgumentParser gives each `--no_<flag>` the help of `--<flag>`
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            name = action.option_strings[0].removeprefix("--no_")
            action.help = f"Turn {name} off (the same as --{name} false)."
    parser.add_argument(
        "--preset",
        type=str,
        default=None,
        choices=sorted(PRESETS),
        help="Named defaults: `paper` reproduces the published method. The file and flags override it.",
    )
    return parser


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):  # a setting's name is a string; anything else is refused later
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist.")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a safe loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML{where}: {problem}.") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of field names to values, not {type(values).__name__}.")
    return values


def parse_config(args: list[str] | None = None, parser: HfArgumentParser | None = None) -> ClipselConfig:
    """Parse ``args`` (default: sys.argv[1:]) into a validated :class:`ClipselConfig`."""
    parser = parser or build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(args)
    values = read_yaml_config(known.config) if known.config else {}
    preset = known.preset or values.get("preset")
    if preset is not None:  # below the file and the flags
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is not valid; choose one of {', '.join(PRESETS)}.")
        parser.set_defaults(**PRESETS[preset])
    if known.config:
        # A run's saved run_config.yaml is a valid --config: its record of versions and command is not a setting.
        values = {key: value for key, value in values.items() if key not in (*RUN_RECORD_KEYS, "preset")}
        ClipselConfig.from_flat(values)  # validates names and values of the file alone, with its own message
        parser.set_defaults(**values)
    namespace = parser.parse_args(args)
    flat = {key: value for key, value in vars(namespace).items() if key not in ("config", "preset")}
    return ClipselConfig.from_flat(flat)
