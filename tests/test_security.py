"""No pickle, no remote code unless asked, and a token never lands in logs, configs or cards."""

import pytest
import torch
from hub_stand_in import HubStandIn, child_env  # tests/ is on sys.path under pytest
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


def test_remote_code_in_a_checkpoint_never_runs_by_default(tmp_path):
    """A checkpoint whose processor config names custom code: loading it must not import that code."""
    import json

    path = build_tiny_clip(tmp_path / "clip")
    marker = tmp_path / "remote_code_ran"
    (path / "custom_processing.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import CLIPProcessor\n"
        "class CustomProcessor(CLIPProcessor):\n    pass\n"
    )
    config = json.loads((path / "processor_config.json").read_text())
    config["auto_map"] = {"AutoProcessor": "custom_processing.CustomProcessor"}
    (path / "processor_config.json").write_text(json.dumps(config))
    try:
        load_clip(ModelConfig(model_name_or_path=str(path)))
    except ValueError as error:  # transformers refuses custom code it was not allowed to run
        assert "trust_remote_code" in str(error)
    assert not marker.exists(), "the checkpoint's code ran without trust_remote_code"
    load_clip(ModelConfig(model_name_or_path=str(path), trust_remote_code=True))
    assert marker.exists()  # the same checkpoint runs it when asked: the test above can fail


def test_a_token_that_is_used_never_appears_in_outputs_or_logs(cifar_slice, tiny_clip_path, tmp_path):
    """A run that pushes to the (local stand-in) Hub with HF_TOKEN set: the token is sent, and written nowhere."""
    with HubStandIn() as hub:
        env = child_env(hub, tmp_path / "home", token=FAKE_TOKEN)
        config = write_config(tmp_path / "run.yaml", cifar_slice, tiny_clip_path, max_samples=64)
        result = cli(
            "run",
            "--config",
            str(config),
            "--output_dir",
            str(tmp_path / "out"),
            "--push_to_hub",
            "true",
            "--hub_dataset_id",
            "acme/token-test",
            env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert any(r.authorization == f"Bearer {FAKE_TOKEN}" for r in hub.requests("commit")), "the token was not used"
        pushed = hub.history("acme/token-test")[-1].files
        assert all(FAKE_TOKEN.encode() not in hub.blob(entry.sha256) for entry in pushed.values() if entry.sha256)
    assert FAKE_TOKEN not in result.stdout + result.stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
