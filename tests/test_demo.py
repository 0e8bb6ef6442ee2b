"""The product as a newcomer meets it: the demo, run from a wheel installed where no source tree is, shows the
method removing injected noise; README's Python quickstart runs as written."""

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from datasets import load_dataset

REPO = Path(__file__).resolve().parents[1]


def _git_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if listed.returncode == 0 and listed.stdout:
        return [name for name in listed.stdout.split("\0") if name]
    # not a git checkout (an unpacked source archive): everything but the usual build and cache folders
    skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
    return [
        str(path.relative_to(REPO))
        for path in REPO.rglob("*")
        if (path.is_file() or path.is_symlink()) and not skip & set(path.relative_to(REPO).parts)
    ]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> dict:
    """A virtual environment with the wheel built from this checkout installed (no editable install, no source
    tree on its path); the test environment's other packages are visible to it through a .pth file."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so building writes nothing into the checkout
    for name in _git_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        origin = REPO / name
        if origin.is_symlink():
            target.symlink_to(os.readlink(origin))
        elif origin.is_file():
            target.write_bytes(origin.read_bytes())
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), "."],
        cwd=source,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (root / "dist").glob("hf_clipsel-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The test environment's packages (torch, datasets, ...) without its site hooks, so its editable install of
    # hf_clipsel (a .pth finder pointing at the checkout) is not loaded.
    Path(site, "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", site, str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    return {"python": str(python), "site": site, "cwd": root}


def _in_wheel_env(wheel_env: dict, *args: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return subprocess.run(
        [wheel_env["python"], *args], cwd=wheel_env["cwd"], capture_output=True, text=True, env=environment
    )


@pytest.mark.slow
def test_the_demo_from_an_installed_wheel_removes_the_injected_noise(wheel_env):
    where = _in_wheel_env(wheel_env, "-c", "import hf_clipsel.cards as m; print(m.TEMPLATES_DIR)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.strip().startswith(wheel_env["site"]), "hf_clipsel was not imported from the wheel"
    assert str(REPO) not in where.stdout

    assert _in_wheel_env(wheel_env, "-m", "hf_clipsel.cli", "run", "--help").returncode == 0
    demo = _in_wheel_env(wheel_env, "-m", "hf_clipsel.cli", "demo", "--output_dir", "demo_output")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert demo.stdout.startswith("DEMONSTRATION:") and "toy" in demo.stdout.splitlines()[-1]
    assert "kept label noise" in demo.stdout and "(random " in demo.stdout

    output_dir = Path(wheel_env["cwd"]) / "demo_output"
    noise = json.loads((output_dir / "run_summary.json").read_text())["injected_noise"]
    pool = noise["pool"]["noisy"]
    assert 0.2 <= pool <= 0.25  # 20% label noise, 3% damaged images, some rows both
    half = noise["ratios"]["0.5"]
    assert half["selected"]["noisy"] < pool / 2, noise
    assert half["selected"]["noisy"] < half["random"]["noisy"], noise
    assert half["selected"]["damaged"] < half["random"]["damaged"], noise
    # the report says the same, from the template and figures the wheel ships
    page = (output_dir / "report" / "index.html").read_text()
    assert "injected noise kept at ratio 0.5" in page
    assert (output_dir / "README.md").read_text().count("ratio_0.5") >= 2  # the card, from the shipped template
    subset = load_dataset(str(output_dir), "ratio_0.5", split="train")
    assert len(subset) == 498 and subset.features["label"].names[0] == "zero" and "is_noisy" in subset.column_names


def _python_quickstart() -> str:
    section = REPO.joinpath("README.md").read_text().split("### Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


@pytest.mark.slow
def test_the_readme_python_quickstart_runs_as_written(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(_python_quickstart())
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r"(\d+) rows kept, (\d+) of them with injected noise", result.stdout)
    assert printed, result.stdout[-2000:]
    kept, noisy = map(int, printed.groups())
    assert kept == 498 and noisy < 0.1 * kept  # half of the 997-row pool; the pool itself is over 20% noise
