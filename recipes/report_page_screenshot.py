"""The README's picture of the report page (recipes/assets/report_page.png): the demo's explorer, class "five",
sorted by semantic alignment, lowest first, as headless Chromium shows it.

    hf-clipsel demo --output_dir /tmp/demo
    python recipes/report_page_screenshot.py /tmp/demo recipes/assets/report_page.png

Needs chromium, chromium-driver (Debian) and selenium. The PNG is reduced to 128 colours to stay small.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from PIL import Image

from hf_clipsel.report import INDEX, REPORT_DIR


def main(argv: list[str] | None = None) -> None:
    from selenium import webdriver
    from selenium.webdriver.support.ui import Select, WebDriverWait

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="A run's output_dir (the demo's).")
    parser.add_argument("target", type=Path, help="Where to save the PNG.")
    parser.add_argument("--class_name", default="five", help="The class to filter to.")
    args = parser.parse_args(argv)
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900", "--hide-scrollbars"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get((args.output_dir / REPORT_DIR / INDEX).resolve().as_uri())

        def ready(before: int):
            status = driver.find_element("id", "clipsel-status")
            return status.get_attribute("data-state") == "ready" and int(status.get_attribute("data-refresh")) > before

        WebDriverWait(driver, 60).until(lambda d: ready(0))
        Select(driver.find_element("id", "f-class")).select_by_visible_text(args.class_name)
        WebDriverWait(driver, 60).until(lambda d: ready(1))
        Select(driver.find_element("id", "f-sort")).select_by_value("semantic_alignment")
        WebDriverWait(driver, 60).until(lambda d: ready(2))
        driver.execute_script("document.getElementById('explore').scrollIntoView()")
        time.sleep(1)  # the lazily loaded thumbnails now in view
        driver.save_screenshot(str(args.target))
    finally:
        driver.quit()
    Image.open(args.target).convert("RGB").quantize(colors=128).save(args.target, optimize=True)
    print(f"{args.target}: {args.target.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
