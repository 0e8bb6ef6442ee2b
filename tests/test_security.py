"""No pickle, no remote code unless asked, and a token never lands in logs, configs or cards."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel

from hf_clipsel.configs import ModelConfig
from hf_clipsel.modeling import load_adapters, load_clip
from hf_clipsel.tiny import build_tiny_clip
from tests.conftest import cli, write_config

FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"


def test_checkpoints_without_safetensors_are_refused(tmp_path):
    path = build_tiny_clip(tmp_path / "clip")
    state = load_file(path / "model.safetensors")
    torch.save(state, path / "pytorch_model.bin")  # a pickle: the format hf_clipsel must not load
    (path / "model.safetensors").unlink()
    with pytest.raises(OSError):
        load_clip(ModelConfig(model_name_or_path=str(path)))


def test_adapters_without_safetensors_are_refused(tmp_path, tiny_clip_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    torch.save({}, tmp_path / "adapter" / "adapter_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        load_adapters(CLIPModel.from_pretrained(tiny_clip_path), str(tmp_path / "adapter"))


def test_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False


def test_a_token_in_the_environment_never_appears_in_outputs_or_logs(cifar_slice, tiny_clip_path, tmp_path):
    import os

    config = write_config(tmp_path / "run.yaml", cifar_slice, tiny_clip_path, max_samples=64)
    result = cli(
        "run",
        "--config",
        str(config),
        "--output_dir",
        str(tmp_path / "out"),
        env={**os.environ, "HF_TOKEN": FAKE_TOKEN},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert FAKE_TOKEN not in result.stdout + result.stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
