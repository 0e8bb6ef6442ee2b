"""`hf-clipsel report`: what a run kept, what it dropped and why, as PNG figures and one HTML page.

    output_dir/report/
      index.html                    summary, figures, galleries, flagged rows; references only files in report/
      score_distributions.png       histograms of SAS and SDS, all usable rows and the rows each ratio keeps
      alignment_vs_diversity.png    SAS against SDS, one panel per ratio, kept rows coloured
      kept_per_class.png            rows kept per class at each ratio
      thumbnails/row_<row_id>.png   the gallery images (a subfolder, so report/*.png are the figures only)
      data/, images/                the explorer's paged scores and thumbnails (hf_clipsel.report_page)

It reads only the run's files (scores/*.parquet, run_summary.json, run_config.yaml) and, for the gallery
images, the source dataset named in run_config.yaml. The galleries:

- **Lowest alignment**: the usable rows with the lowest ``semantic_alignment`` (lowest first, ties by row_id),
  with the given label and the class CLIP prefers (``predicted_label``): likely mislabelled or damaged images.
- **Dropped as redundant at ratio r**: the rows whose ``drop_reason_ratio_<r>`` is ``redundant`` (aligned with
  their label, but in the crowded half of their class), most redundant first: lowest ``sample_diversity``, ties
  by row_id. r defaults to the smallest ratio of the run, the strictest budget. (The scores keep no neighbour
  index, so a tile cannot show the kept row it duplicates; its class and diversity say where it sits.)
- **Damaged**: the rows the damage check flagged (the scores' ``damage`` column: noisy, low contrast, blurry), in
  row order, with whether a subset still holds them (damaged rows are ranked last, not excluded).
- **Flagged rows**: rows with a ``flag_reason`` (undecodable image, missing or out-of-range label), in row order.

Each tile and each listed row names its file (the base name of the scores' ``path``) where the source has one.

A gallery image that cannot be decoded, or a source that cannot be loaded, gives a placeholder, never an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from importlib.resources import files
from pathlib import Path, PurePath

import numpy as np
from jinja2 import Environment, StrictUndefined

from .configs import DataConfig
from .kept_noise import describe_kept_noise
from .outputs import atomic_directory, read_run_config
from .report_data import RunScores, read_scores
from .report_page import fit_thumbnail, source_reader, write_page
from .scores import score_columns
from .scores.damage import DamageCheck
from .scores.diversity import SampleDiversity
from .summary import RatioSummary, RunSummary

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
INDEX = "index.html"
THUMBNAILS_DIR = "thumbnails"
TEMPLATE = "report_template.html.j2"
GALLERY_SIZE = 24
MAX_FLAGGED_SHOWN = 200
THUMBNAIL_SIDE = 128  # pixels; small images (CIFAR's 32) are enlarged without smoothing so they stay sharp


@dataclass
class Tile:
    """One image of a gallery or of the flagged table, with what the page says about it."""

    row_id: int
    given_label: str
    predicted_label: str
    semantic_alignment: float
    sample_diversity: float
    kept_at: list[str]  # ratios (as text) whose subset holds the row
    thumbnail: str | None = None  # path relative to report/, None when there is no image to show
    missing_image: str = ""  # why there is no thumbnail
    flag_reason: str = ""
    path: str = ""  # the image file as the source names it ("" where it holds bytes only)
    damage: str = ""  # what the damage check found ("" where nothing)

    @property
    def mislabelled_suspect(self) -> bool:
        return self.predicted_label not in ("", self.given_label)

    @property
    def file_name(self) -> str:
        """The base name of the row's file: what a user finds in their folder ("" without a path)."""
        return PurePath(self.path).name if self.path else ""


def lowest_alignment_rows(scores: RunScores, count: int = GALLERY_SIZE) -> np.ndarray:
    """Positions of the ``count`` usable rows with the lowest semantic alignment, lowest first, ties by row_id."""
    candidates = np.nonzero(scores.usable)[0]
    order = np.lexsort((scores.row_id[candidates], scores.semantic_alignment[candidates]))
    return candidates[order[:count]]


def redundant_rows(scores: RunScores, selection_ratio: float, count: int = GALLERY_SIZE) -> np.ndarray:
    """Positions of the rows dropped as redundant at ``selection_ratio``, most redundant (lowest diversity) first."""
    candidates = np.nonzero(scores.drop_reason[selection_ratio] == SampleDiversity.drop_reason)[0]
    order = np.lexsort((scores.row_id[candidates], scores.sample_diversity[candidates]))
    return candidates[order[:count]]


def damaged_rows(scores: RunScores, count: int = GALLERY_SIZE) -> np.ndarray:
    """Positions of the first ``count`` rows the damage check flagged, in row order."""
    return np.nonzero(scores.damage != "")[0][:count]


def duplicate_groups(scores: RunScores, groups: list[dict] | None, per_group: int = 6) -> list[np.ndarray]:
    """Positions of the rows of the run summary's largest near-duplicate ``groups`` (each in row order, at most
    ``per_group``), so the page shows each group's copies side by side."""
    if not groups or scores.duplicate_group is None:
        return []
    return [np.nonzero(scores.duplicate_group == entry["group"])[0][:per_group] for entry in groups]


def flagged_rows(scores: RunScores, count: int = MAX_FLAGGED_SHOWN) -> np.ndarray:
    return np.nonzero(~scores.usable)[0][:count]


def _class_name(scores: RunScores, label: int) -> str:
    return scores.class_names[label] if 0 <= label < len(scores.class_names) else ""


def make_tiles(scores: RunScores, positions: np.ndarray) -> list[Tile]:
    return [
        Tile(
            row_id=int(scores.row_id[p]),
            given_label=_class_name(scores, int(scores.label[p])),
            predicted_label=_class_name(scores, int(scores.predicted_label[p])),
            semantic_alignment=float(scores.semantic_alignment[p]),
            sample_diversity=float(scores.sample_diversity[p]),
            kept_at=[f"{r:g}" for r, mask in scores.selected.items() if mask[p]],
            flag_reason=str(scores.flag_reason[p]),
            path=str(scores.path[p]),
            damage=str(scores.damage[p]),
        )
        for p in positions
    ]


def load_gallery_source(run_config: dict, num_rows: int):
    """The source dataset as the run loaded it and its image column, or (None, why not)."""
    from .data import detect_image_column, load_source

    keys = {f.name for f in fields(DataConfig)}
    if not run_config.get("dataset_name"):  # a source passed in memory: nothing to load it again from
        return None, "the source was a dataset in memory"
    try:
        data_config = DataConfig(**{key: value for key, value in run_config.items() if key in keys})
        dataset = load_source(data_config)
        image_column = detect_image_column(dataset, data_config.image_column)
    except Exception as error:  # a moved file, no network, a deleted Hub repo: the report goes on without images
        logger.warning("report: gallery images skipped, the source dataset did not load: %s", error)
        return None, f"source dataset not available ({type(error).__name__})"
    if len(dataset) != num_rows:
        return None, f"the source has {len(dataset)} rows but the scores {num_rows}: not the run's source"
    return (dataset, image_column), ""


def write_thumbnails(tiles: list[Tile], source, missing_reason: str, report_dir: Path) -> None:
    """Decode each tile's image from the source and save it under thumbnails/; a failure leaves a placeholder."""
    from datasets import Image

    from .data import decode_rgb

    if source is None:
        for tile in tiles:
            tile.missing_image = missing_reason
        return
    dataset, image_column = source
    row_ids = sorted({tile.row_id for tile in tiles})
    cells = dataset.select(row_ids).cast_column(image_column, Image(decode=False))[image_column]
    images = dict(zip(row_ids, cells))
    (report_dir / THUMBNAILS_DIR).mkdir(exist_ok=True)
    for tile in tiles:
        image, error = decode_rgb(images[tile.row_id])
        if image is None:
            tile.missing_image = error.split(":")[0]  # "image failed to decode"; the full text is in the table
            continue
        relative = f"{THUMBNAILS_DIR}/row_{tile.row_id}.png"
        if not (report_dir / relative).exists():  # a row in two galleries is written once
            fit_thumbnail(image, THUMBNAIL_SIDE).save(report_dir / relative)
        tile.thumbnail = relative


GATE_TEXT = {
    "agreement": "on: only rows whose given label is the class CLIP prefers earn the diversity term",
    "none": "off: every row earns the diversity term (the released reward)",
}


ALIGNMENT_TEXT = {
    "posterior": "CLIP's probability of the given label over all classes",
    "sas+posterior": "SAS plus CLIP's probability of the given label over all classes",
    "sas": "SAS alone (the paper's)",
}


def damage_check_text(run_config: dict, summary: RunSummary) -> str:
    """Whether the pixel check ran and what it flagged (run_summary.json's flag counts of its ``damage`` column)."""
    if not run_config.get("damage_check", False):
        return "off"
    found = ", ".join(f"{count} {kind}" for kind, count in summary.flags.get("damage", {}).items()) or "none"
    share = run_config.get("damage_false_discovery")
    beyond = "" if share is None else f", a tail only beyond its mirror at {share:g}"
    return f"on (threshold {run_config.get('damage_threshold', 'n/a')} robust SD{beyond}): images flagged: {found}"


def adapter_check_text(check: dict) -> str:
    """What the held-out check decided, in a sentence (run_summary.json's adapter_check)."""
    verdict = "fell back: the scores use zero-shot CLIP features" if check["fell_back"] else "adapters kept"
    text = (
        f"{verdict} (label agreement on {check['held_out_rows']} held-out rows: adapted "
        f"{check['adapted_agreement']:.3f}, zero-shot {check['zero_shot_agreement']:.3f}"
    )
    if "sign_test_p_value" in check:
        text += f"; sign test p = {check['sign_test_p_value']:.2g}, needs <= {1 - check['confidence']:.2g}"
    return text + ")"


def summary_rows(summary: RunSummary, run_config: dict, scores: RunScores) -> list[tuple[str, str]]:
    """The summary table: (what, value) pairs, from run_summary.json and run_config.yaml."""
    alpha = run_config.get("alpha")
    dataset = str(summary.dataset or run_config.get("dataset_name"))
    split = run_config.get("dataset_split", "train")
    if run_config.get("max_samples"):
        split += f", first {run_config['max_samples']} rows"
    rows = [
        ("dataset", f"{dataset} (split {split})"),
        ("model", str(summary.model or run_config.get("model_name_or_path"))),
        ("adapters", f"{run_config.get('adapter_preset', 'n/a')}, {run_config.get('adapter_epochs', 'n/a')} epochs"),
        *([("adapter check", adapter_check_text(summary.adapter_check))] if summary.adapter_check else []),
        ("selection method", str(summary.selection_method or run_config.get("selection_method"))),
        ("alpha (weight of diversity)", "equal to each ratio" if alpha is None else f"{alpha:g}"),
        ("diversity gate", GATE_TEXT.get(run_config.get("diversity_gate", "none"), "n/a")),
        ("alignment term", ALIGNMENT_TEXT.get(run_config.get("alignment", "sas"), "n/a")),
        ("damage check", damage_check_text(run_config, summary)),
        *[
            (f"flagged ({column})", ", ".join(f"{count} {kind}" for kind, count in counts.items()) or "none")
            for column, counts in summary.flags.items()
            if column != DamageCheck.flag_column  # the damage check's line above says it with its settings
        ],
        *[(f"score: {column.name}", f"{column.meaning}; {column.value_range}") for column in score_columns()],
        ("k nearest neighbours (SDS)", str(run_config.get("knn_k", "n/a"))),
        ("rows scored", str(len(scores.row_id))),
        ("rows flagged (never selected)", str(int((~scores.usable).sum()))),
    ]
    for ratio in scores.ratios:
        info = summary.ratios.get(f"{ratio:g}", RatioSummary())
        kept = int(scores.selected[ratio].sum())
        text = f"{kept} rows ({kept / max(len(scores.row_id), 1):.1%})"
        if info.shortfall:
            text += f", {info.shortfall} short of the budget of {info.budget}"
        dropped = info.dropped_by_reason
        if dropped:
            text += "; dropped: " + ", ".join(f"{count:,} {reason}" for reason, count in dropped.items())
        rows.append((f"kept at ratio {ratio:g}", text))
    for pair, share in summary.ratio_overlap.items():
        small, large = pair.split("->")
        rows.append((f"stability: kept at {small}, kept at {large} too", f"{share:.1%}"))
    for ratio, share in summary.seed_overlap.items():
        rows.append((f"stability: kept at {ratio} with adapters trained on other seeds", f"{share:.1%}"))
    noise = summary.injected_noise
    if noise:  # the source carries hf_clipsel.benchmarking.noise's record columns: how much of it each subset kept
        rows.append(("injected noise in the pool", describe_kept_noise(noise["pool"])))
        for ratio, kept in noise["ratios"].items():
            text = describe_kept_noise(kept["selected"], kept["random"], "random subset of the same size:")
            rows.append((f"injected noise kept at ratio {ratio}", text))
    return rows


def per_class_rows(scores: RunScores, least_kept_first: bool) -> list[dict]:
    """Usable and kept rows per class; in label order, or (for many classes) least kept at the smallest ratio first."""
    usable = scores.usable
    num_classes = len(scores.class_names)
    totals = np.bincount(scores.label[usable], minlength=num_classes)
    kept = {r: np.bincount(scores.label[usable & m], minlength=num_classes) for r, m in scores.selected.items()}
    order = np.arange(num_classes)
    if least_kept_first:  # a reader of a long table looks for the classes a ratio starves
        order = np.lexsort((order, kept[scores.ratios[0]] / np.maximum(totals, 1)))
    return [
        {"name": scores.class_names[c], "total": int(totals[c]), "kept": [int(kept[r][c]) for r in scores.ratios]}
        for c in order
    ]


def exact_alphas(run_config: dict, ratios: list[float]) -> dict[float, float] | None:
    """alpha per ratio when the subsets are exactly the top-k of the paper's reward (SAS~ and SDS~ alone), so that a
    line of equal reward explains them; else None. The class posterior, the diversity gate and the demotion of
    damaged rows all change the reward in ways a line in the SAS-SDS plane cannot show."""
    paper_reward = (
        run_config.get("selection_method", "exact") == "exact"
        and not run_config.get("class_balanced")
        and run_config.get("alignment", "sas") == "sas"
        and run_config.get("diversity_gate", "none") == "none"
        and not run_config.get("damage_check", False)
    )
    if not paper_reward:
        return None
    alpha = run_config.get("alpha")
    return {r: (r if alpha is None else float(alpha)) for r in ratios}


def render_page(**context) -> str:
    environment = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = environment.from_string(files("hf_clipsel").joinpath(TEMPLATE).read_text(encoding="utf-8"))
    return template.render(**context)


def write_report(output_dir: str | Path, gallery_ratio: float | None = None, thumbnails: str = "sample") -> Path:
    """Write output_dir/report/ (figures, thumbnails, index.html) from a finished run; return index.html's path.

    ``thumbnails``: the explorer's thumbnails, "sample" (every row of a small run, a sample per class and outcome of
    a large one) or "all" (hf_clipsel.report_page).

    ``gallery_ratio`` picks the ratio of the "dropped as redundant" gallery (default: the smallest). The folder is
    written beside its place and renamed into it, so a report is whole or absent. Needs matplotlib (the `report`
    extra).
    """
    try:
        from .report_figures import (
            DPI,
            FIGURES,
            MAX_CLASSES_AS_BARS,
            WIDTH_INCHES,
            figure_height_pixels,
            write_figures,
        )
    except ImportError as error:
        raise ImportError(f"the report needs matplotlib: pip install 'hf-clipsel[report]' ({error})") from error

    output_dir = Path(output_dir)
    scores = read_scores(output_dir)
    run_config = read_run_config(output_dir) or {}
    summary = RunSummary.read(output_dir)
    if not scores.ratios:
        raise ValueError(f"{output_dir}: the scores hold no selection; run `hf-clipsel select` first.")
    if gallery_ratio is None:
        gallery_ratio = scores.ratios[0]
    elif gallery_ratio not in scores.selected:
        raise ValueError(f"gallery_ratio {gallery_ratio:g} is not a ratio of this run ({scores.ratios}).")

    many_classes = len(scores.class_names) > MAX_CLASSES_AS_BARS  # the table then follows the figure: by share
    low_alignment = make_tiles(scores, lowest_alignment_rows(scores))
    redundant = make_tiles(scores, redundant_rows(scores, gallery_ratio))
    damaged = make_tiles(scores, damaged_rows(scores))
    flagged = make_tiles(scores, flagged_rows(scores))
    largest_groups = duplicate_groups(scores, summary.duplicate_groups.get("largest"))
    duplicates = [make_tiles(scores, rows) for rows in largest_groups]
    source, missing_reason = load_gallery_source(run_config, len(scores.row_id))
    with atomic_directory(output_dir / REPORT_DIR) as directory:
        write_figures(scores, directory, exact_alphas(run_config, scores.ratios))
        tiles = low_alignment + redundant + damaged + flagged + [tile for group in duplicates for tile in group]
        write_thumbnails(tiles, source, missing_reason, directory)
        explorer = write_page(output_dir, directory, source and source_reader(source), thumbnails)
        page = render_page(
            explorer=explorer,
            title=f"hf-clipsel report: {summary.dataset or run_config.get('dataset_name') or output_dir.name}",
            summary=summary_rows(summary, run_config, scores),
            figures={
                name: {"path": name, "height": figure_height_pixels(name, len(scores.ratios))} for name in FIGURES
            },
            figure_width=round(WIDTH_INCHES * DPI),
            ratios=[f"{r:g}" for r in scores.ratios],
            gallery_ratio=f"{gallery_ratio:g}",
            low_alignment=low_alignment,
            redundant=redundant,
            num_redundant=int((scores.drop_reason[gallery_ratio] == SampleDiversity.drop_reason).sum()),
            damaged=damaged,
            num_damaged=int((scores.damage != "").sum()),
            damage_check=bool(run_config.get("damage_check", False)),
            flagged=flagged,
            duplicates=duplicates,
            duplicate_groups=summary.duplicate_groups,
            num_flagged=int((~scores.usable).sum()),
            classes=per_class_rows(scores, least_kept_first=many_classes),
            classes_by_share=many_classes,
            command=run_config.get("command", ""),
            gated=run_config.get("diversity_gate") == "agreement",
            reward_line=exact_alphas(run_config, scores.ratios) is not None,
            zero_shot_scores=run_config.get("adapter_preset") == "none"
            or bool((summary.adapter_check or {}).get("fell_back")),
        )
        (directory / INDEX).write_text(page, encoding="utf-8")
    return output_dir / REPORT_DIR / INDEX
