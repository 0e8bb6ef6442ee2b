"""Render a run's report page with headless Chromium and save what a reader sees: report/screenshot.png.

    python recipes/report_screenshot.py outputs/cifar10             # writes the report first if it is missing
    python recipes/report_screenshot.py outputs/cifar10 --rebuild   # writes the report again first

Needs Chromium (Debian/Ubuntu: `apt-get install chromium`; elsewhere Google Chrome works too). The screenshot is
for looking at the page during development; it is not part of a run's outputs and should not be committed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageChops

from hf_clipsel.report import INDEX, REPORT_DIR, write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# No network, no first-run UI, no background services: the page is a local file and nothing else should load.
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit(
        "report_screenshot: no Chromium found. Install it (Debian/Ubuntu: `sudo apt-get update && sudo apt-get "
        "install -y chromium`), or put google-chrome on PATH."
    )


def trim_bottom(path: Path, margin: int = 40) -> None:
    """Cut the blank window below the page: headless Chromium captures the window, not the page."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    background = Image.new("RGB", image.size, image.getpixel((image.width - 1, image.height - 1)))
    box = ImageChops.difference(image, background).getbbox()
    if box is not None and box[3] + margin < image.height:
        image.crop((0, 0, image.width, box[3] + margin)).save(path)


def screenshot(output_dir: Path, width: int = 1400, height: int = 12000, rebuild: bool = False) -> Path:
    index = output_dir / REPORT_DIR / INDEX
    if rebuild or not index.exists():
        index = write_report(output_dir)
    target = output_dir / REPORT_DIR / "screenshot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                find_browser(),
                *HEADLESS_FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={target}",
                f"--window-size={width},{height}",
                index.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    trim_bottom(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="A run's output_dir.")
    parser.add_argument("--width", type=int, default=1400, help="Window width in pixels.")
    parser.add_argument(
        "--height", type=int, default=12000, help="Window height in pixels: the most of the page captured."
    )
    parser.add_argument("--rebuild", action="store_true", help="Write the report again before the screenshot.")
    args = parser.parse_args(argv)
    print(screenshot(args.output_dir, args.width, args.height, args.rebuild))


if __name__ == "__main__":
    main()
