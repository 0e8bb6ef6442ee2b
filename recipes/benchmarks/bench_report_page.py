"""The report page at ImageNet-1k size: a synthetic run of 1,281,167 rows opened and filtered in headless Chromium.

1. A scores table in the library's own format (scores_table.scores_features plus a selection's columns, written by
   outputs.write_scores) with 1000 classes and three ratios: labels uniform, CLIP's class the given one for 85% of
   the rows, 0.1% undecodable, 1% damaged, each ratio keeping the top rewards and a drop reason for every other row
   (hf_clipsel.reasons' codes, assigned by simple rules: this measures the page, not the method).
2. The page's data and thumbnails written by hf_clipsel.report_page.write_page (thumbnails="sample": a few per class
   and outcome; the images are synthetic 32x32 tiles, so the writer's time excludes decoding a real source). The
   explorer is wrapped in a bare page: the real report/index.html adds the summary table and three PNG figures.
3. Headless Chromium (selenium) opens it by file:// and times each action from the click to the page's "ready"
   status (so the figures include selenium's round trips): open, switch ratio, filter by class, by reason, sort by
   a score (loading that column first), next page, open a row's details, reset, sort every row.

    python recipes/benchmarks/bench_report_page.py            # about 3 minutes on 2 cores
    python recipes/benchmarks/bench_report_page.py --num_rows 100000 --num_classes 100

Needs chromium, chromium-driver (Debian) and selenium (`pip install selenium`). Target: every action under 5 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from _common import footer, header, table
from PIL import Image

from hf_clipsel import reasons
from hf_clipsel.outputs import write_scores
from hf_clipsel.report_page import write_page
from hf_clipsel.scores_table import drop_reason_column, reward_column, scores_features, selected_column

RATIOS = (0.3, 0.5, 0.7)
TARGET_S = 5.0


def synthetic_scores(num_rows: int, num_classes: int, seed: int = 0):
    """A scores table with a selection, in the library's format (see the module doc)."""
    from datasets import Dataset, Features, Value

    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_classes, num_rows)
    agrees = rng.random(num_rows) < 0.85
    predicted = np.where(agrees, label, rng.integers(0, num_classes, num_rows))
    undecodable = rng.random(num_rows) < 0.001
    predicted[undecodable] = -1
    sas = np.clip(rng.normal(0.25, 0.04, num_rows) - 0.06 * ~agrees, -1, 1).astype(np.float32)
    sds = rng.gamma(4.0, 0.1, num_rows).astype(np.float32)
    posterior = rng.beta(2, 2, num_rows).astype(np.float32)
    damage = np.where(rng.random(num_rows) < 0.01, rng.choice(["noisy", "low contrast", "blurry"], num_rows), "")
    damage[undecodable] = ""

    def normalized(values: np.ndarray) -> np.ndarray:
        usable = values[~undecodable]
        return np.where(undecodable, 0, (values - usable.min()) / (usable.max() - usable.min())).astype(np.float32)

    columns = {
        "row_id": np.arange(num_rows, dtype=np.int64),
        "label": label,
        "given_label": label.astype(str),
        "predicted_label": predicted,
        "decode_ok": ~undecodable,
        "flag_reason": np.where(undecodable, "image failed to decode: UnidentifiedImageError", ""),
        "semantic_alignment": np.where(undecodable, 0, sas).astype(np.float32),
        "sample_diversity": np.where(undecodable, 0, sds).astype(np.float32),
        "semantic_alignment_normalized": normalized(sas),
        "sample_diversity_normalized": normalized(sds),
        "class_posterior": posterior,
        "class_posterior_normalized": normalized(posterior),
        "noise_level": rng.gamma(2.0, 0.005, num_rows).astype(np.float32),
        "contrast": rng.uniform(0.1, 0.4, num_rows).astype(np.float32),
        "sharpness": rng.uniform(0.3, 0.7, num_rows).astype(np.float32),
        "damage": damage,
    }
    features = {**scores_features([f"class_{c:04d}" for c in range(num_classes)]), "damage": Value("string")}
    redundant = columns["sample_diversity_normalized"] < np.median(columns["sample_diversity_normalized"])
    for ratio in RATIOS:
        reward = columns["semantic_alignment_normalized"] + ratio * columns["sample_diversity_normalized"]
        reward = np.where(undecodable, np.nan, np.where(damage != "", reward - 10, reward)).astype(np.float32)
        kept = np.zeros(num_rows, dtype=bool)
        kept[np.argsort(-np.nan_to_num(reward, nan=-np.inf), kind="stable")[: int(ratio * num_rows)]] = True
        reason = np.select(
            [kept, undecodable, damage != "", ~agrees, redundant],
            [reasons.KEPT, reasons.UNDECODABLE, reasons.DAMAGED, reasons.MISALIGNED, reasons.REDUNDANT],
            reasons.OUTSIDE_BUDGET,
        )
        columns[reward_column(ratio)], features[reward_column(ratio)] = reward, Value("float32")
        columns[selected_column(ratio)], features[selected_column(ratio)] = kept, Value("bool")
        columns[drop_reason_column(ratio)], features[drop_reason_column(ratio)] = reason, Value("string")
    return Dataset.from_dict(columns, features=Features(features))


def synthetic_images(row_ids: list[int]) -> list[Image.Image]:
    """32x32 tiles whose colour follows the row id: what the writer encodes, without a source to decode."""
    return [Image.new("RGB", (32, 32), ((r * 37) % 256, (r * 91) % 256, (r * 13) % 256)) for r in row_ids]


def chromium():
    from selenium import webdriver

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None or shutil.which("chromedriver") is None:
        raise SystemExit("needs chromium and chromedriver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.binary_location = binary
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))


def measure_actions(index: Path, num_classes: int) -> list[dict]:
    """Seconds from each action to the page's results (see the module doc)."""
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = chromium()

    def status():
        element = driver.find_element("id", "clipsel-status")
        return element.get_attribute("data-state"), int(element.get_attribute("data-refresh") or 0)

    def wait_ready(before: int) -> None:
        WebDriverWait(driver, 120, poll_frequency=0.02).until(
            lambda d: status()[0] == "ready" and status()[1] > before
        )

    def select(element_id: str, value: str) -> None:
        Select(driver.find_element("id", element_id)).select_by_value(value)

    def matches() -> int:
        return int(driver.find_element("id", "clipsel-status").get_attribute("data-matches"))

    rows = []
    try:
        start = time.perf_counter()
        driver.get(index.resolve().as_uri())
        wait_ready(0)
        rows.append(
            {"action": "open (load the core columns, count, first page)", "seconds": time.perf_counter() - start}
        )
        steps = [
            ("switch ratio to 0.5", lambda: select("f-ratio", "1")),
            (f"filter by class (class {num_classes // 2})", lambda: select("f-class", str(num_classes // 2))),
            ("filter by reason (redundant) in that class", lambda: select("f-reason", reasons.REDUNDANT)),
            ("clear the class: reason redundant, every class", lambda: select("f-class", "")),
            ("sort by semantic_alignment (loads the column)", lambda: select("f-sort", "semantic_alignment")),
            ("sort highest first", lambda: select("f-order", "desc")),
        ]
        for name, action in steps:
            before = status()[1]
            start = time.perf_counter()
            action()
            wait_ready(before)
            rows.append({"action": name, "seconds": time.perf_counter() - start, "rows shown": matches()})
        info = driver.find_element("id", "p-info").text
        start = time.perf_counter()
        driver.find_element("id", "p-next").click()
        WebDriverWait(driver, 60, poll_frequency=0.02).until(lambda d: d.find_element("id", "p-info").text != info)
        rows.append({"action": "next page of tiles", "seconds": time.perf_counter() - start})
        start = time.perf_counter()
        driver.find_element("css selector", "#clipsel-grid figure").click()
        WebDriverWait(driver, 60, poll_frequency=0.02).until(
            lambda d: d.find_element("id", "clipsel-detail").is_displayed()
        )
        rows.append(
            {"action": "open a row's details (one page of every column)", "seconds": time.perf_counter() - start}
        )
        driver.find_element("id", "d-close").click()
        for name, action in [
            ("reset the filters (every row)", lambda: driver.find_element("id", "f-reset").click()),
            ("sort every row by sample_diversity (loads it)", lambda: select("f-sort", "sample_diversity")),
        ]:
            before = status()[1]
            start = time.perf_counter()
            action()
            wait_ready(before)
            rows.append({"action": name, "seconds": time.perf_counter() - start, "rows shown": matches()})
    finally:
        driver.quit()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_rows", type=int, default=1_281_167)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/hf_clipsel_bench/report_page"))
    args = parser.parse_args()
    started = time.perf_counter()
    header(f"report page: {args.num_rows:,} rows, {args.num_classes} classes, ratios {', '.join(map(str, RATIOS))}")
    shutil.rmtree(args.work_dir, ignore_errors=True)
    report_dir = args.work_dir / "report"
    report_dir.mkdir(parents=True)

    start = time.perf_counter()
    write_scores(args.work_dir, synthetic_scores(args.num_rows, args.num_classes))
    print(f"synthetic scores table written in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    explorer = write_page(args.work_dir, report_dir, synthetic_images, thumbnails="sample")
    writer_s = time.perf_counter() - start
    index = report_dir / "index.html"
    index.write_text(
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"></head><body>{explorer}</body></html>'
    )
    data_mib = sum(p.stat().st_size for p in (report_dir / "data").iterdir()) / 2**20
    images = list((report_dir / "images").rglob("*.webp"))
    text = (report_dir / "data" / "manifest.js").read_text()
    manifest = json.loads(text[text.index("(") + 1 : text.rindex(")")])
    core = {spec["file"] for spec in manifest["columns"].values() if spec["core"]}
    core_mib = sum(p.stat().st_size for p in (report_dir / "data").glob("*-*.js") if p.stem[:-6] in core) / 2**20
    print(
        f"writer (report_page.write_page): {writer_s:.1f} s; data/ {data_mib:.1f} MiB in "
        f"{len(list((report_dir / 'data').iterdir()))} files ({core_mib:.1f} MiB loaded on opening); "
        f"{len(images):,} thumbnails, {sum(p.stat().st_size for p in images) / 2**20:.1f} MiB"
    )
    rows = measure_actions(index, args.num_classes)
    for row in rows:
        row["under 5 s"] = "yes" if row["seconds"] < TARGET_S else "NO"
    table(rows, ["action", "seconds", "rows shown", "under 5 s"])
    footer(started)


if __name__ == "__main__":
    main()
