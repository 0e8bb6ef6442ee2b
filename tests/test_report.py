"""The report of a real (tiny) run: figures that open at their size, a page whose links all resolve, galleries
that show the rows the scores say they should (with their file names), flagged rows listed with their reason and
file, no crash on bad images."""

import io
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import Dataset, Image, load_dataset
from PIL import Image as PILImage

from hf_clipsel.cli import main
from hf_clipsel.pipeline import run
from hf_clipsel.report import GALLERY_SIZE, INDEX, REPORT_DIR, exact_alphas, write_report
from hf_clipsel.report_figures import DPI, FIGURES, WIDTH_INCHES, figure_height_pixels
from hf_clipsel.runs.record import verify
from tests.conftest import run_config

UNDECODABLE = (3, 10)
LABEL_MISSING = 20
NOISY = (40, 41, 42, 43)  # heavy additive noise: the damage check's to find
RATIOS = [0.3, 0.5]


def file_of(row: int) -> str:
    """The path the fixture gives each row's image (beside its bytes, as an image folder's rows carry one)."""
    return f"photos/class_{row % 3}/img_{row:03d}.png"


def with_noise(png: bytes, seed: int) -> bytes:
    pixels = np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    noisy = pixels + np.random.default_rng(seed).normal(0, 80, pixels.shape)
    out = io.BytesIO()
    PILImage.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


class PageParser(HTMLParser):
    """Every src/href of the page, and the row ids shown under each element with an id (gallery or table)."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.rows: dict[str, list[int]] = {}
        self.images_of_row: dict[int, list[str]] = {}
        self.file_of_row: dict[str, dict[int, str]] = {}  # section -> row -> the file name its tile shows
        self._section = None
        self._row = None
        self._in_file = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[key] for key in ("src", "href") if attrs.get(key)]
        if "id" in attrs:
            self._section = attrs["id"]
        if "data-row-id" in attrs:
            self._row = int(attrs["data-row-id"])
            self.rows.setdefault(self._section, []).append(self._row)
            self.images_of_row.setdefault(self._row, [])
        if tag == "img" and self._row is not None and self._section in ("lowest-alignment", "flagged"):
            self.images_of_row[self._row].append(attrs["src"])
        self._in_file = "file" in (attrs.get("class") or "").split() and self._row is not None

    def handle_data(self, data):
        if self._in_file:
            self.file_of_row.setdefault(self._section, {})[self._row] = data.strip()

    def handle_endtag(self, tag):
        self._in_file = False


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory, cifar_slice) -> Path:
    """A tiny CLIP trained on the slice (seconds): it mostly prefers the given label, as a real CLIP does on clean
    CIFAR-10, so rows are dropped as redundant and not all as misaligned (a random one agrees on 1 in 10)."""
    from hf_clipsel.tiny import train_tiny_clip

    rows = Dataset.from_parquet(str(cifar_slice))
    images = [image.convert("RGB") for image in rows["img"]]
    names = rows.features["label"].names
    return train_tiny_clip(tmp_path_factory.mktemp("trained_clip"), images, rows["label"], names, epochs=4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cifar_slice, trained_clip) -> Path:
    """A run on the CIFAR-10 slice with two undecodable images, one missing label, four noisy images, and a file
    path beside each image's bytes."""
    work = tmp_path_factory.mktemp("report")
    source = Dataset.from_parquet(str(cifar_slice)).cast_column("img", Image(decode=False))

    def damage(row, index):
        row["img"] = {"bytes": row["img"]["bytes"], "path": file_of(index)}
        if index in UNDECODABLE:
            row["img"] = {"bytes": b"not an image at all", "path": file_of(index)}
        if index in NOISY:
            row["img"]["bytes"] = with_noise(row["img"]["bytes"], index)
        if index == LABEL_MISSING:
            row["label"] = -1
        return row

    damaged = work / "damaged.parquet"
    source.map(damage, with_indices=True).cast_column("img", Image()).to_parquet(str(damaged))
    output_dir = work / "run"
    # sas+posterior: with the posterior alone (the default) this weak tiny CLIP keeps only rows it agrees with, so
    # every dropped row is `misaligned` and the redundant gallery would have nothing to show.
    run(run_config(damaged, trained_clip, output_dir, selection_ratios=RATIOS, alignment="sas+posterior"))
    write_report(output_dir)
    return output_dir


def parse_page(index: Path) -> PageParser:
    parser = PageParser()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


def scores_table(run_dir: Path) -> dict[str, np.ndarray]:
    table = pa.concat_tables([pq.read_table(path) for path in sorted((run_dir / "scores").glob("*.parquet"))])
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def test_figure_names_are_stable():
    # The dataset card embeds these files by name: renaming one breaks cards already on the Hub.
    assert FIGURES == ("score_distributions.png", "alignment_vs_diversity.png", "kept_per_class.png")


def test_figures_open_at_their_size(run_dir):
    for name in FIGURES:
        with PILImage.open(run_dir / REPORT_DIR / name) as image:
            image.load()
            assert image.size == (round(WIDTH_INCHES * DPI), figure_height_pixels(name, len(RATIOS))), name


def test_page_references_only_files_in_the_report(run_dir):
    report = (run_dir / REPORT_DIR).resolve()
    page = parse_page(report / INDEX)
    assert page.links, "the page links nothing"
    for link in page.links:
        assert "://" not in link and not link.startswith("/"), link  # relative: the folder can move or be pushed
        target = (report / link).resolve()
        assert target.is_file() and target.is_relative_to(report), link
    assert {f"{name}" for name in FIGURES} <= set(page.links)


def test_lowest_alignment_gallery_shows_the_lowest_rows(run_dir):
    scores = scores_table(run_dir)
    usable = scores["flag_reason"] == ""
    candidates = np.nonzero(usable)[0]
    order = candidates[np.lexsort((scores["row_id"][candidates], scores["semantic_alignment"][candidates]))]
    expected = scores["row_id"][order[:GALLERY_SIZE]].tolist()
    page = parse_page(run_dir / REPORT_DIR / INDEX)
    assert page.rows["lowest-alignment"] == expected
    for row in expected:  # every image of the slice decodes: each tile shows its thumbnail
        assert page.images_of_row[row] == [f"thumbnails/row_{row}.png"]


def test_redundancy_gallery_lists_exactly_the_rows_dropped_as_redundant_with_their_files(run_dir):
    scores = scores_table(run_dir)
    ratio = f"{RATIOS[0]:g}"
    redundant = np.nonzero(scores[f"drop_reason_ratio_{ratio}"] == "redundant")[0]
    assert 0 < len(redundant), "the slice has rows dropped as redundant at the smallest ratio"
    order = redundant[np.lexsort((scores["row_id"][redundant], scores["sample_diversity"][redundant]))]
    page = parse_page(run_dir / REPORT_DIR / INDEX)
    shown = page.rows["dropped-as-redundant"]
    assert shown == scores["row_id"][order[:GALLERY_SIZE]].tolist()  # the most redundant, lowest diversity first
    # The defect it names: well-aligned rows dropped for another reason (damaged, misaligned) shown as redundant.
    assert set(scores[f"drop_reason_ratio_{ratio}"][shown]) == {"redundant"}
    assert page.file_of_row["dropped-as-redundant"] == {row: f"img_{row:03d}.png" for row in shown}
    html = (run_dir / REPORT_DIR / INDEX).read_text(encoding="utf-8")
    assert f"{len(redundant)} rows have this reason" in html


def test_damaged_gallery_lists_exactly_the_rows_the_damage_check_flagged_with_their_files(run_dir):
    scores = scores_table(run_dir)
    damaged = np.nonzero(scores["damage"] != "")[0]
    assert set(NOISY) <= set(damaged.tolist()) and len(damaged) <= GALLERY_SIZE
    page = parse_page(run_dir / REPORT_DIR / INDEX)
    assert page.rows["damaged"] == scores["row_id"][damaged].tolist()
    assert page.file_of_row["damaged"] == {row: f"img_{row:03d}.png" for row in damaged}
    html = (run_dir / REPORT_DIR / INDEX).read_text(encoding="utf-8")
    assert f"Damaged: flagged by the damage check ({len(damaged)})" in html
    gallery = html[html.index('id="damaged"') : html.index("<h2>Flagged rows")]
    for row in NOISY:  # what it found is on the tile, and the full path in its title
        tile = gallery.split(f'data-row-id="{row}"')[1].split("</figure>")[0]
        assert f'title="{file_of(row)}"' in tile and '<b class="differs">noisy</b>' in tile


def test_flagged_rows_are_listed_with_their_reason_and_bad_images_get_a_placeholder(run_dir):
    page = parse_page(run_dir / REPORT_DIR / INDEX)
    assert page.rows["flagged"] == [*UNDECODABLE, LABEL_MISSING]
    assert page.file_of_row["flagged"] == {row: f"img_{row:03d}.png" for row in page.rows["flagged"]}
    html = (run_dir / REPORT_DIR / INDEX).read_text(encoding="utf-8")
    assert html.count("image failed to decode: UnidentifiedImageError") == len(UNDECODABLE)
    assert "label missing" in html
    for row in UNDECODABLE:
        assert page.images_of_row[row] == []  # no image: a placeholder
    assert page.images_of_row[LABEL_MISSING] == [f"thumbnails/row_{LABEL_MISSING}.png"]  # the image is fine


def test_report_command_picks_the_gallery_ratio(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("embeddings"))
    assert main(["report", "--output_dir", str(copy), "--gallery_ratio", "0.5"]) == 0
    assert "Dropped as redundant at ratio 0.5" in (copy / REPORT_DIR / INDEX).read_text(encoding="utf-8")
    verify(copy, deep=True)  # the new report is part of the run: its record lists it
    with pytest.raises(ValueError, match="not a ratio of this run"):
        write_report(copy, gallery_ratio=0.9)


def test_a_missing_source_gives_placeholders_not_an_error(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("embeddings", "adapter", "subsets"))
    config = yaml.safe_load((copy / "run_config.yaml").read_text())
    config["dataset_name"] = str(tmp_path / "moved_away.parquet")
    (copy / "run_config.yaml").write_text(yaml.safe_dump(config))
    page = parse_page(write_report(copy))
    assert len(page.rows["lowest-alignment"]) == GALLERY_SIZE
    assert not any(link.startswith("thumbnails/") for link in page.links)
    assert "source dataset not available" in (copy / REPORT_DIR / INDEX).read_text(encoding="utf-8")


def test_scores_read_back_with_load_dataset_match_the_page(run_dir):
    # The page's numbers come from the same file users load: the lowest SAS shown is the minimum over usable rows.
    scores = load_dataset(str(run_dir), "scores", split="train").with_format("numpy")
    usable = scores["flag_reason"][:] == ""
    lowest = int(scores["row_id"][:][usable][np.argmin(scores["semantic_alignment"][:][usable])])
    assert parse_page(run_dir / REPORT_DIR / INDEX).rows["lowest-alignment"][0] == lowest


def test_summary_says_what_the_adapter_check_decided_and_why_rows_were_dropped(run_dir):
    import json
    from collections import Counter

    page = (run_dir / REPORT_DIR / INDEX).read_text(encoding="utf-8")
    check = json.loads((run_dir / "run_summary.json").read_text())["adapter_check"]
    verdict = "fell back: the scores use zero-shot CLIP features" if check["fell_back"] else "adapters kept"
    assert f"{verdict} (label agreement on {check['held_out_rows']} held-out rows" in page
    assert "zero-shot CLIP image feature" in page if check["fell_back"] else "adapted CLIP image feature" in page
    assert "on: only rows whose given label is the class CLIP prefers earn the diversity term" in page
    scores = scores_table(run_dir)
    for ratio in RATIOS:
        reasons = Counter(r for r in scores[f"drop_reason_ratio_{ratio:g}"] if r)
        assert reasons, ratio
        expected = "; dropped: " + ", ".join(f"{count:,} {reason}" for reason, count in reasons.items())
        row = page[page.index(f"kept at ratio {ratio:g}") :].split("</tr>")[0]
        assert sorted(row.split("; dropped: ")[1].removesuffix("</td>").split(", ")) == sorted(
            expected.removeprefix("; dropped: ").split(", ")
        )


def test_the_line_of_equal_reward_is_drawn_only_for_the_reward_it_describes():
    from hf_clipsel.configs import ClipselConfig

    # the default reward adds the class posterior, the diversity gate and the demotion of damaged rows: no line
    assert exact_alphas(ClipselConfig.from_flat({}).to_flat(), [0.3]) is None
    assert exact_alphas(ClipselConfig.from_flat({"preset": "paper"}).to_flat(), [0.3, 0.5]) == {0.3: 0.3, 0.5: 0.5}
    paper_fixed_alpha = ClipselConfig.from_flat({"preset": "paper", "alpha": 0.1}).to_flat()
    assert exact_alphas(paper_fixed_alpha, [0.3]) == {0.3: 0.1}
    assert exact_alphas({**paper_fixed_alpha, "selection_method": "sgd"}, [0.3]) is None


def test_the_explorer_pages_carry_each_rows_file(run_dir):
    import base64
    import json
    import re

    data = run_dir / REPORT_DIR / "data"
    manifest = json.loads(re.fullmatch(r"CLIPSEL_MANIFEST\((.*)\);\n", (data / "manifest.js").read_text()).group(1))
    spec = manifest["columns"]["path"]
    assert spec["type"] == "text" and not spec["core"]  # loaded with a row's details, not when the page opens
    paths = []
    for page in range(manifest["num_pages"]):
        text = (data / f"{spec['file']}-{page:05d}.js").read_text()
        payload = re.fullmatch(r'CLIPSEL_CHUNK\("path",\d+,"(.*)"\);\n', text).group(1)
        paths += json.loads(base64.b64decode(payload))
    assert paths == scores_table(run_dir)["path"].tolist() == [file_of(row) for row in range(len(paths))]
