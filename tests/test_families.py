"""Every encoder family (hf_clipsel.models) through the whole tool, on a tiny random model of its own built offline:
`run`, the stage commands, both adapter presets, two processes, the Hub stand-in and `load_run`; its zero-shot scores
against the model's own `get_image_features` / `get_text_features`; SigLIP's prompts against transformers' zero-shot
pipeline; NaFlex images of several aspect ratios; and checkpoints of no supported family refused at once."""

import json
import os
import socket
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, Features, Image, Value
from hub_stand_in import ChildWorker, HubStandIn, child_env  # tests/ is on sys.path under pytest
from PIL import Image as PILImage

from hf_clipsel.cli import main
from hf_clipsel.configs import ModelConfig
from hf_clipsel.data import class_prompts
from hf_clipsel.modeling import load_model, model_fingerprint
from hf_clipsel.models import FAMILIES, EncoderFamily, family_of, get_family, register_family
from hf_clipsel.pipeline import run
from hf_clipsel.tiny import build_tiny_model
from tests.conftest import cli, run_config, write_config

MODEL_TYPES = ["clip", "metaclip_2", "siglip", "siglip2"]
ROWS = 32  # zero-shot rows checked against the model's own features
SETTINGS = dict(max_samples=128, adapter_epochs=2, selection_ratios=[0.5])  # two chunks of 64: two processes share


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    return {
        model_type: build_tiny_model(model_type, tmp_path_factory.mktemp(model_type)) for model_type in MODEL_TYPES
    }


@pytest.fixture(scope="module")
def runs(models, cifar_slice, tmp_path_factory) -> dict:
    """A projection-preset run of each family (``hf_clipsel.run``), shared by the tests that read one."""
    folders = {}
    for model_type, model in models.items():
        folders[model_type] = tmp_path_factory.mktemp(f"run-{model_type}") / "run"
        run(run_config(cifar_slice, model, folders[model_type], **SETTINGS))
    return folders


def _scores(folder) -> pd.DataFrame:
    return pd.read_parquet(folder / "scores")


# -- registry -------------------------------------------------------------------------------------------------------
def test_the_registry_refuses_duplicates_and_non_families():
    assert set(MODEL_TYPES) <= set(FAMILIES)
    with pytest.raises(ValueError, match="already registered"):
        register_family(type("Again", (EncoderFamily,), {"model_type": "siglip"}))
    with pytest.raises(ValueError, match="EncoderFamily subclass"):
        register_family(lambda: None)
    with pytest.raises(ValueError, match="supported model types: clip, metaclip_2, siglip, siglip2"):
        get_family("blip")


def test_a_family_from_an_entry_point_is_found_by_its_model_type(tmp_path, monkeypatch):
    """A third-party package registers a family through the `hf_clipsel.families` entry point group."""
    (tmp_path / "my_family.py").write_text(
        textwrap.dedent(
            """
            from hf_clipsel.models.clip import ClipFamily

            class MyFamily(ClipFamily):
                model_type = "my_clip"
            """
        )
    )
    info = tmp_path / "my_family-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-family\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[hf_clipsel.families]\nmy_clip = my_family:MyFamily\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert type(get_family("my_clip")).__name__ == "MyFamily"
    finally:
        FAMILIES.pop("my_clip", None)


@pytest.mark.parametrize("kind", ["unsupported", "open_clip"])
def test_a_checkpoint_of_no_supported_family_fails_at_once_with_one_line(kind, tmp_path, capsys):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    if kind == "unsupported":
        (folder / "config.json").write_text(json.dumps({"model_type": "blip"}))
        expected = "model_type 'blip' is not a supported image-text encoder"
    else:  # what timm/ViT-*-SigLIP* and timm/PE-Core-* repositories hold
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
        (folder / "open_clip_model.safetensors").write_bytes(b"")
        expected = "is an OpenCLIP checkpoint"
    # A dataset that does not exist: the model is checked before any data is read.
    code = main(["run", "--dataset_name", str(tmp_path / "absent"), "--model_name_or_path", str(folder)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and expected in error and "clip, metaclip_2, siglip, siglip2" in error


# -- every family through the tool ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_zero_shot_scores_are_the_models_own_features(model_type, models, cifar_slice, tmp_path):
    """SAS, the posterior and the predicted label of `--adapter_preset none` equal a direct computation through the
    model's get_image_features / get_text_features, image by image."""
    output = tmp_path / "zero_shot"
    run(run_config(cifar_slice, models[model_type], output, adapter_preset="none", max_samples=ROWS))
    scores = _scores(output)
    model, processor = load_model(ModelConfig(model_name_or_path=str(models[model_type])))
    family = family_of(model)
    source = Dataset.from_parquet(str(cifar_slice)).select(range(ROWS))
    names = source.features["label"].names
    prompts = class_prompts(names, ["a photo of a {}."])[0]
    with torch.no_grad():
        text = model.get_text_features(**family.tokenize(processor.tokenizer, prompts, model.config)).pooler_output
        pixels = processor.image_processor(images=list(source["img"]), return_tensors="pt")
        images = model.get_image_features(**pixels).pooler_output
    cosine = F.normalize(images, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.tensor(source["label"])
    assert np.allclose(scores["semantic_alignment"], cosine[torch.arange(ROWS), labels].numpy(), atol=1e-5)
    assert (scores["predicted_label"].to_numpy() == cosine.argmax(dim=1).numpy()).all()
    posterior = torch.softmax(0.5 * family.logit_scale(model) * cosine, dim=1)[torch.arange(ROWS), labels]
    assert np.allclose(scores["class_posterior"], posterior.numpy(), atol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_stage_commands_reproduce_the_run_and_name_the_checkpoint(model_type, models, runs, cifar_slice, tmp_path):
    """embed, adapt, score and select one after another give the run's scores exactly; the adapters' config names the
    checkpoint as its base model and the run record names its identity (modeling.model_fingerprint)."""
    config = str(write_config(tmp_path / "run.yaml", cifar_slice, models[model_type], **SETTINGS))
    for stage in ("embed", "adapt", "score", "select"):
        assert main([stage, "--config", config, "--output_dir", str(tmp_path / "stages")]) == 0
    pd.testing.assert_frame_equal(_scores(runs[model_type]), _scores(tmp_path / "stages"), check_exact=True)
    adapter = json.loads((runs[model_type] / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(models[model_type])
    assert set(adapter["target_modules"]) == set(get_family(model_type).projection_targets)
    model_config = ModelConfig(model_name_or_path=str(models[model_type]))
    record = json.loads((runs[model_type] / "run_record.json").read_text())
    assert model_fingerprint(model_config, load_model(model_config)[0]) in json.dumps(record)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_encoder_lora_trains_inside_both_towers(model_type, models, cifar_slice, tmp_path):
    """The encoder_lora preset trains LoRA in the encoders' attention (not the MAP head's nn.MultiheadAttention,
    whose out_proj LoRA would be ignored) and the projection preset's modules, and scores through them."""
    output = tmp_path / "encoder"
    settings = dict(SETTINGS, max_samples=64, adapter_epochs=1, embedding_chunk_size=32)
    summary = run(run_config(cifar_slice, models[model_type], output, adapter_preset="encoder_lora", **settings))
    assert summary.num_rows == 64
    from safetensors.torch import load_file

    trained = {name for name, t in load_file(output / "adapter" / "adapter_model.safetensors").items() if t.any()}
    for tower in ("vision_model", "text_model"):
        assert any(f"{tower}.encoder.layers.0.self_attn.q_proj.lora_B" in name for name in trained), tower
    assert not any(".head.attention." in name for name in trained)
    for target in get_family(model_type).projection_targets:
        assert any(f"{target}.lora_B" in name for name in trained), target
    assert _scores(output)["semantic_alignment"].notna().all()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["metaclip_2", "siglip", "siglip2"])  # CLIP's: tests/test_distributed.py
def test_two_processes_give_the_scores_of_one(model_type, models, cifar_slice, tmp_path):
    """Every family (NaFlex: patch sequences and masks through the workers' hand-over), zero-shot (the cheapest
    setting): two CPU processes embed a chunk each and agree exactly with one process."""
    config = str(write_config(tmp_path / "run.yaml", cifar_slice, models[model_type], adapter_preset="none"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = cli("run", "--config", config, "--max_samples", "128", "--output_dir", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = (
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
    )
    two = cli(
        "run",
        "--config",
        config,
        "--max_samples",
        "128",
        "--output_dir",
        str(tmp_path / "two"),
        launcher=launcher,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "process 1 of 2: chunks 1-1 of 2" in two.stderr
    pd.testing.assert_frame_equal(_scores(tmp_path / "one"), _scores(tmp_path / "two"), check_exact=True)


LOAD_RUN = """
from hf_clipsel import load_run
finished = load_run(params["repo"])
result = {"scores": finished.scores.to_pandas().to_json(), "checkpoint": finished.record.to_json()}
"""


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with HubStandIn() as hub:
        home = tmp_path_factory.mktemp("worker")
        with ChildWorker(child_env(hub, home, token="hf_FakeTokenForTests0000000000000000"), cwd=home) as child:
            yield child


@pytest.mark.slow
def test_every_family_pushes_and_loads_back(worker, runs):
    """Each family's run pushed to the Hub stand-in loads back with load_run: the same scores, the same record."""
    push = "from hf_clipsel.cli import main\nresult = main(params['argv'])"
    for model_type, folder in runs.items():
        repo = f"acme/{model_type.replace('_', '-')}-clipsel"
        argv = ["push", "--output_dir", str(folder), "--hub_dataset_id", repo, "--hub_model_id", f"{repo}-adapter"]
        code, output = worker.call(push, {"argv": argv})
        assert code == 0, output[-3000:]
        loaded, output = worker.call(LOAD_RUN, {"repo": repo})
        assert loaded is not None, output[-3000:]
        remote = pd.read_json(__import__("io").StringIO(loaded["scores"]))
        assert np.allclose(remote["semantic_alignment"], _scores(folder)["semantic_alignment"])
        # The record as published: the same run, stages and files; paths of this machine replaced by names and
        # digests of the published files (tests/test_integrity.py checks those), so not byte-equal to the local one.
        published, local = json.loads(loaded["checkpoint"]), json.loads((folder / "run_record.json").read_text())
        assert published["run_id"] == local["run_id"] and published["stages"].keys() == local["stages"].keys()
        assert published["artefacts"].keys() == local["artefacts"].keys()
        assert str(folder) not in loaded["checkpoint"]


# -- what each family's own settings decide -------------------------------------------------------------------------
def test_siglip_prompts_give_the_class_features_of_transformers_zero_shot_pipeline(models):
    """The tiny SigLIP's tokenizer returns input_ids only and must pad to max_length: the family's tokenisation gives
    the features of the zero-shot-image-classification pipeline's text path."""
    from transformers import pipeline

    from hf_clipsel.modeling import class_text_features, text_tower_outputs

    model, processor = load_model(ModelConfig(model_name_or_path=str(models["siglip"])))
    assert list(processor.tokenizer(["a cat"])) == ["input_ids"]
    classifier = pipeline(
        "zero-shot-image-classification",
        model=model,
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
    )
    prompts = ["This is a photo of cat.", "This is a photo of a big dog."]
    text_inputs = classifier.preprocess(PILImage.new("RGB", (32, 32)), ["cat", "a big dog"])["text_inputs"][0]
    with torch.no_grad():
        expected = F.normalize(model.get_text_features(**text_inputs).pooler_output, dim=-1)
        ours = class_text_features(model, text_tower_outputs(model, processor.tokenizer, prompts)[None])
    assert text_inputs["input_ids"].shape[1] == 64
    torch.testing.assert_close(ours, expected)


def test_naflex_embeds_images_of_different_aspect_ratios(models, tmp_path):
    """Wide, tall and square images in one batch: each embedding is the model's own for that image alone."""
    from accelerate import Accelerator

    from hf_clipsel.embedding import embed_images, pooled_matrix
    from hf_clipsel.modeling import image_features

    rng = np.random.default_rng(0)
    images = [
        PILImage.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        for shape in [(16, 64, 3), (72, 24, 3), (40, 40, 3)]
    ]
    data = Dataset.from_dict(
        {"row_id": [0, 1, 2], "img": images}, features=Features({"row_id": Value("int64"), "img": Image()})
    )
    model, processor = load_model(ModelConfig(model_name_or_path=str(models["siglip2"])))
    embeddings = embed_images(
        data, "img", model, processor.image_processor, "naflex", tmp_path, Accelerator(), batch_size=3, chunk_size=3
    )
    # DataLoader workers hand the patch sequences, masks and shapes over: the same numbers
    workers = embed_images(
        data,
        "img",
        model,
        processor.image_processor,
        "naflex",
        tmp_path / "workers",
        Accelerator(),
        3,
        3,
        num_workers=1,
    )
    assert torch.equal(pooled_matrix(workers), pooled_matrix(embeddings))
    shapes = processor.image_processor(images=images, return_tensors="pt")["spatial_shapes"].tolist()
    assert len({tuple(shape) for shape in shapes}) == 3  # three patch grids
    with torch.no_grad():
        ours = image_features(model, pooled_matrix(embeddings))
        alone = torch.cat(
            [
                model.get_image_features(**processor.image_processor(images=[im], return_tensors="pt")).pooler_output
                for im in images
            ]
        )
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_workers_hand_over_what_the_image_processor_computes(model_type, models, cifar_slice):
    """uint8 crops normalised on the device where the family allows it (CLIP's processor; SigLIP's squash with mean
    and std 0.5), the processor's whole output where not (NaFlex); either way bit-identical to the processor."""
    from hf_clipsel.data import decode_rgb
    from hf_clipsel.modeling import normalises_on_device
    from hf_clipsel.preprocessing import Preprocessing, prepare_batch

    model, processor = load_model(ModelConfig(model_name_or_path=str(models[model_type])))
    cells = Dataset.from_parquet(str(cifar_slice)).select(range(8)).cast_column("img", Image(decode=False))["img"]
    preprocessing = Preprocessing(
        processor.image_processor, jpeg_draft=True, device_normalisation=normalises_on_device(model)
    )
    ready = prepare_batch(list(cells), preprocessing)
    inputs = preprocessing.finish_inputs(ready, torch.device("cpu"))
    expected = processor.image_processor(images=[decode_rgb(cell)[0] for cell in cells], return_tensors="pt")
    assert set(inputs) == set(expected)
    for name in expected:
        assert torch.equal(inputs[name], expected[name]), name
    naflex = model_type == "siglip2"
    assert preprocessing.deferred == (not naflex) and (ready["pixel_values"].dtype == torch.uint8) == (not naflex)
    assert preprocessing.draft_size == (None if naflex else (32, 32))  # NaFlex has no fixed resize target


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_bfloat16_tower_gives_the_float32_features_to_bfloat16_precision(model_type, models, cifar_slice):
    """The image tower in bfloat16 (the default on a GPU), what runs after the cache and the text tower in float32."""
    from hf_clipsel.modeling import image_features, vision_tower_outputs

    images = list(Dataset.from_parquet(str(cifar_slice)).select(range(8))["img"])
    features = {}
    for dtype in ("float32", "bfloat16"):
        model, processor = load_model(ModelConfig(model_name_or_path=str(models[model_type]), dtype=dtype))
        inputs = processor.image_processor(images=images, return_tensors="pt")
        with torch.no_grad():
            features[dtype] = image_features(model, vision_tower_outputs(model, inputs))
    assert features["bfloat16"].dtype == torch.float32
    assert F.cosine_similarity(features["float32"], features["bfloat16"]).min() > 0.99


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_projection_preset_trains_on_the_cache_with_the_familys_loss(model_type, models, cifar_slice):
    """Adapters after the cache boundary learn the labels from cached vectors alone (CLIP: softmax cross-entropy;
    SigLIP: its sigmoid loss), and the cached path equals a full forward through the adapted model."""
    from hf_clipsel.configs import AdapterConfig
    from hf_clipsel.embedding import embed_class_prompts
    from hf_clipsel.modeling import attach_adapters, image_features, vision_tower_outputs
    from hf_clipsel.training import train_on_cache

    model, processor = load_model(ModelConfig(model_name_or_path=str(models[model_type])))
    source = Dataset.from_parquet(str(cifar_slice)).select(range(64))
    config = AdapterConfig(adapter_epochs=8, adapter_learning_rate=1e-2, adapter_batch_size=16)
    peft_model = attach_adapters(model, config)
    inputs = processor.image_processor(images=list(source["img"]), return_tensors="pt")
    names = source.features["label"].names
    with torch.no_grad():
        cached = vision_tower_outputs(peft_model, inputs)
        text_pooled = embed_class_prompts(peft_model, processor.tokenizer, class_prompts(names, ["a photo of a {}."]))
    history = train_on_cache(
        peft_model, cached, torch.tensor(source["label"]), text_pooled, config, show_progress=False
    )
    assert history[-1] < 0.9 * history[0], history
    with torch.no_grad():
        full = peft_model.get_image_features(**inputs).pooler_output
        torch.testing.assert_close(image_features(peft_model, cached), full, atol=1e-5, rtol=1e-5)


def test_a_sigmoid_posterior_is_the_given_labels_own_probability():
    """A family may declare ``posterior = "sigmoid"``: the sigmoid of the given label's logit (scale * cos + bias)."""
    from hf_clipsel.scoring import class_posterior

    generator = torch.Generator().manual_seed(0)
    images, text = torch.randn(6, 4, generator=generator), F.normalize(torch.randn(3, 4, generator=generator), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    cosine = (F.normalize(images, dim=-1) @ text.T)[torch.arange(6), labels]
    posterior = class_posterior(images, text, labels, 10.0, -3.0, link="sigmoid")
    torch.testing.assert_close(posterior, torch.sigmoid(10.0 * cosine - 3.0))
    with pytest.raises(ValueError, match="softmax or sigmoid"):
        class_posterior(images, text, labels, 10.0, link="tanh")
