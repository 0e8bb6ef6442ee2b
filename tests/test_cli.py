"""The `hf-clipsel` command: the environment report and the stage commands chained by hand (the demo: test_demo)."""

import pandas as pd

from tests.conftest import cli as _cli
from tests.conftest import write_config


def test_env_prints_versions_and_devices():
    result = _cli("env")
    assert result.returncode == 0
    for name in (
        "torch:",
        "transformers:",
        "datasets:",
        "peft:",
        "cuda:",
        "huggingface_hub version:",
        "HF_HUB_CACHE:",
    ):
        assert name in result.stdout


def test_help_lists_commands_and_fields():
    assert "select" in _cli("--help").stdout
    help_text = _cli("run", "--help").stdout
    assert "--selection_ratios" in help_text and "--knn_k" in help_text and "--config" in help_text


def test_stage_commands_give_the_same_outputs_as_run(cifar_slice, tiny_clip_path, tmp_path):
    config = write_config(tmp_path / "run.yaml", cifar_slice, tiny_clip_path, selection_ratios=[0.3], max_samples=120)
    whole = _cli("run", "--config", str(config), "--output_dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    for stage in ("embed", "adapt", "score", "select"):
        result = _cli(stage, "--config", str(config), "--output_dir", str(tmp_path / "staged"))
        assert result.returncode == 0, f"{stage}: {result.stderr[-3000:]}"
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "whole" / "scores"),
        pd.read_parquet(tmp_path / "staged" / "scores"),
        check_exact=True,
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "whole" / "subsets" / "ratio_0.3"),
        pd.read_parquet(tmp_path / "staged" / "subsets" / "ratio_0.3"),
        check_exact=True,
    )


def test_score_before_adapt_says_what_to_run(cifar_slice, tiny_clip_path, tmp_path):
    result = _cli(
        "score",
        "--dataset_name",
        str(cifar_slice),
        "--model_name_or_path",
        str(tiny_clip_path),
        "--max_samples",
        "20",
        "--output_dir",
        str(tmp_path),
    )
    assert result.returncode == 1 and "run `hf-clipsel adapt` first" in result.stderr


def test_each_no_flag_says_what_it_turns_off():
    help_text = " ".join(_cli("run", "--help").stdout.split())
    assert "--no-damage-check Turn damage_check off (the same as --damage_check false)." in help_text


def test_a_ctrl_c_that_lands_in_a_weakref_callback_still_interrupts():
    """Python drops a KeyboardInterrupt raised while a weakref callback runs; one Ctrl-C during garbage collection
    let the whole run finish (CI saw exit code 0 instead of 130)."""
    import subprocess
    import sys

    program = """
import sys, time, weakref
from hf_clipsel.cli import answer_every_ctrl_c
answer_every_ctrl_c()
class Thing: pass
def callback(_): raise KeyboardInterrupt  # where a Ctrl-C during garbage collection lands
thing = Thing(); ref = weakref.ref(thing, callback); del thing
try:
    for _ in range(1000): time.sleep(0.01)
except KeyboardInterrupt:
    sys.exit(130)
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Exception ignored" not in result.stderr


def test_ctrl_c_ends_with_one_line_and_no_traceback(cifar_slice, tiny_clip_path, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    config = write_config(tmp_path / "run.yaml", cifar_slice, tiny_clip_path)
    output_dir = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_clipsel.cli", "run", "--config", str(config), "--output_dir", str(output_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (output_dir / ".hf_clipsel.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("hf-clipsel run: interrupted; the same command resumes")
