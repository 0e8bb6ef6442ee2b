"""What a push publishes: the run, with this machine's paths replaced by names.

A run records where its inputs were on this machine (``dataset_name``, ``model_name_or_path``, ``adapter_path``,
``output_dir``, ``cache_dir``, the command line, the scores' ``path`` column). None of that is published:
:func:`published_copy` makes, in a staging folder beside the run, a copy (hard links) in which

- every local path a setting names becomes the name of its file or folder (``/data/me/cifar10`` -> ``cifar10``) in
  ``run_config.yaml``, ``run_summary.json``, the run record, the report's text files and the adapters' config, so
  the card rendered from the copy names the source by its Hub id or its folder's name;
- the scores' ``path`` column holds each image's path relative to the source's folder (``cat/0001.png``), or its
  file name where the image lies outside it (a path of the Hugging Face cache, say);
- the record lists the sha256 of these published files, so ``load_run(repo_id)`` checks what it downloads against
  what was pushed.

The run's own folder is left as it is (a local reader keeps the absolute paths it can act on).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import yaml

from .core.names import PATH, RECORD
from .hub_access import is_hub_repo_id
from .outputs import ADAPTER_DIR, REPORT_DIR, RUN_CONFIG, RUN_SUMMARY, SCORES_DIR, write_atomic_text
from .report_page_data import DATA_DIR, map_text_column
from .runs.record import RunRecord, file_digest

# The settings that may name a file or folder of this machine.
PATH_SETTINGS = ("dataset_name", "model_name_or_path", "adapter_path", "output_dir", "cache_dir", "scores_from")
TEXT_SUFFIXES = (".html", ".json", ".md", ".txt", ".svg", ".csv", ".yaml")


def local_names(config: dict, record: RunRecord) -> dict[str, str]:
    """``{local path: published name}`` for every setting of ``config`` (run_config.yaml) and ``record`` that names
    a path of this machine (as written and resolved), longest first so that a path is replaced before its parent."""
    values = [config.get(key) for key in PATH_SETTINGS]
    for stage in record.stages.values():
        values += [stage.get("settings", {}).get(key) for key in PATH_SETTINGS] + [stage.get("scores_from")]
    names = {}
    for value in values:
        if not isinstance(value, str) or not value or is_hub_repo_id(value):
            continue
        path = Path(value).expanduser()
        name = path.resolve().name or value
        for form in {value, str(path), str(path.resolve())}:
            if form not in (".", "/", name):
                names[form] = name
    return dict(sorted(names.items(), key=lambda item: -len(item[0])))


def scrub(value, names: dict[str, str]):
    """``value`` (strings, and lists and dicts of them) with every local path of ``names`` replaced by its name."""
    if isinstance(value, str):
        for local, name in names.items():
            value = value.replace(local, name)
        return value
    if isinstance(value, list):
        return [scrub(item, names) for item in value]
    if isinstance(value, dict):
        return {key: scrub(item, names) for key, item in value.items()}
    return value


def source_folder(config: dict) -> Path | None:
    """The folder the source's image paths are relative to: ``dataset_name``'s, or the folder of a source file."""
    name = config.get("dataset_name")
    if not isinstance(name, str) or is_hub_repo_id(name) or not Path(name).expanduser().exists():
        return None
    path = Path(name).expanduser().resolve()
    return path if path.is_dir() else path.parent


def published_path(path: str | None, source: Path | None) -> str | None:
    """An image path as published: relative to ``source`` when it lies inside it, else its file name."""
    if not path or not os.path.isabs(path):
        return path
    resolved = Path(path).resolve()
    if source is not None and source in resolved.parents:
        return resolved.relative_to(source).as_posix()
    return resolved.name


def _rewrite_scores(shard: Path, source: Path | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(shard)
    if PATH not in table.column_names:
        return
    paths = [published_path(p, source) for p in table.column(PATH).to_pylist()]
    table = table.set_column(table.column_names.index(PATH), PATH, pa.array(paths, type=table.schema.field(PATH).type))
    temporary = shard.with_name(f".{shard.name}.tmp")
    pq.write_table(table, temporary)  # a new file: the hard link to the run's own shard is left as it was
    os.replace(temporary, shard)


def _rewrite_text(path: Path, names: dict[str, str]) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # a picture: no paths in it
        return
    escaped = {html.escape(local): html.escape(name) for local, name in names.items()}  # as the report writes them
    published = scrub(scrub(text, names), escaped if path.suffix == ".html" else {})
    if published != text:
        write_atomic_text(path, published)  # a new file: the hard link to the run's own file is left as it was


def published_copy(staging: Path, record: RunRecord) -> RunRecord:
    """Make ``staging`` (hard links of a verified run's artefacts) what a push publishes, and return its record."""
    config_path = staging / RUN_CONFIG
    config = (yaml.safe_load(config_path.read_text()) if config_path.exists() else None) or {}
    names = local_names(config, record)
    source = source_folder(config)
    if config_path.exists():
        write_atomic_text(config_path, yaml.safe_dump(scrub(config, names), sort_keys=False, allow_unicode=True))
    for name in (RUN_SUMMARY, f"{ADAPTER_DIR}/adapter_config.json"):
        if (staging / name).exists():
            content = scrub(json.loads((staging / name).read_text()), names)
            write_atomic_text(staging / name, json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    for path in sorted((staging / REPORT_DIR).rglob("*")):
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            _rewrite_text(path, names)
    for shard in sorted((staging / SCORES_DIR).glob("*.parquet")):
        _rewrite_scores(shard, source)
    # The report page's row details carry the same paths, base64-encoded where the text rewrite cannot see them.
    map_text_column(staging / REPORT_DIR / DATA_DIR, PATH, lambda path: published_path(path, source))
    published = RunRecord.from_json(json.dumps(scrub(json.loads(record.to_json()), names)))
    published.artefacts = {name: file_digest(staging / name) for name in record.artefacts}
    write_atomic_text(staging / RECORD, published.to_json())
    return published
