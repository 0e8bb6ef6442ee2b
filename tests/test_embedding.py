"""Embedding: batched datasets.map, chunked on-disk cache reused by reruns, undecodable images flagged."""

import os
import shutil

import torch
from accelerate import Accelerator
from datasets import load_dataset

from hf_clipsel import embedding
from hf_clipsel.configs import ModelConfig
from hf_clipsel.data import with_row_ids
from hf_clipsel.embedding import STATISTICS_DIR_PREFIX, embed_images, pooled_matrix
from hf_clipsel.modeling import load_clip, model_fingerprint, vision_tower_outputs
from hf_clipsel.preprocessing import ChunkWork, Preprocessing, prepare_batch, prepared_chunks
from tests.conftest import embedding_chunks


def _count_forwards(model):
    calls = []
    model.vision_model.register_forward_hook(lambda module, args, output: calls.append(len(args[0]) if args else 1))
    return calls


def _setup(cifar_slice, tiny_clip_path, tmp_path, rows: int, chunk_size: int):
    """``rows`` rows of the fixture, the tiny CLIP with a forward counter, and embed_images' keyword arguments."""
    dataset = with_row_ids(load_dataset("parquet", data_files=str(cifar_slice), split="train").select(range(rows)))
    config = ModelConfig(model_name_or_path=str(tiny_clip_path))
    model, processor = load_clip(config)
    kwargs = dict(
        model_fingerprint=model_fingerprint(config, model),
        cache_dir=tmp_path,
        accelerator=Accelerator(),
        batch_size=20,
        chunk_size=chunk_size,
    )
    return dataset, model, processor, _count_forwards(model), kwargs


def test_rerun_reuses_the_cache_and_matches_a_direct_forward(cifar_slice, tiny_clip_path, tmp_path):
    dataset, model, processor, calls, kwargs = _setup(cifar_slice, tiny_clip_path, tmp_path, 100, 40)
    first = embed_images(dataset, "img", model, processor.image_processor, **kwargs)
    assert len(calls) == 5  # 100 rows in batches of 20
    embedding_files = embedding_chunks(tmp_path)
    assert len(embedding_files) == 3
    assert len(list(tmp_path.glob(STATISTICS_DIR_PREFIX + "*/chunk-*-of-00003.arrow"))) == 3

    second = embed_images(dataset, "img", model, processor.image_processor, **kwargs)
    assert len(calls) == 5, "a rerun must not embed again"
    assert second["row_id"][:] == list(range(100))
    torch.testing.assert_close(pooled_matrix(first), pooled_matrix(second), rtol=0, atol=0)

    pixel_values = processor.image_processor(
        images=[image.convert("RGB") for image in dataset["img"][:20]], return_tensors="pt"
    ).pixel_values
    with torch.no_grad():
        direct = vision_tower_outputs(model, pixel_values)
    torch.testing.assert_close(pooled_matrix(first)[:20], direct, rtol=0, atol=0)


def test_a_different_model_gets_its_own_cache(cifar_slice, tiny_clip_path, tmp_path):
    dataset = with_row_ids(load_dataset("parquet", data_files=str(cifar_slice), split="train").select(range(20)))
    for dtype in ("float32", "bfloat16"):
        config = ModelConfig(model_name_or_path=str(tiny_clip_path), dtype=dtype)
        model, processor = load_clip(config)
        embed_images(
            dataset,
            "img",
            model,
            processor.image_processor,
            model_fingerprint(config, model),
            tmp_path,
            Accelerator(),
            batch_size=20,
            chunk_size=20,
        )
    folders = sorted(path.name for path in tmp_path.iterdir())
    assert len(folders) == 3, "one embedding cache per model, one set of pixel statistics for both"
    assert sum(name.startswith(STATISTICS_DIR_PREFIX) for name in folders) == 1


def test_a_changed_damage_check_recomputes_the_statistics_and_keeps_the_embeddings(
    cifar_slice, tiny_clip_path, tmp_path, monkeypatch
):
    dataset, model, processor, calls, kwargs = _setup(cifar_slice, tiny_clip_path, tmp_path, 40, 20)
    first = embed_images(dataset, "img", model, processor.image_processor, **kwargs)
    embedding_files = {path: path.stat().st_mtime_ns for path in embedding_chunks(tmp_path)}
    from hf_clipsel.scores.damage import DamageCheck

    monkeypatch.setattr(DamageCheck, "version", DamageCheck.version + 1)  # what a changed damage check declares
    second = embed_images(dataset, "img", model, processor.image_processor, **kwargs)
    assert len(calls) == 2, "the embeddings are reused: no forward for the new statistics"
    assert {path: path.stat().st_mtime_ns for path in embedding_chunks(tmp_path)} == embedding_files
    assert len(list(tmp_path.glob(STATISTICS_DIR_PREFIX + "*"))) == 2, "the new version has a cache of its own"
    assert second.to_dict() == first.to_dict()


def test_bfloat16_runs_the_image_tower_only_in_bfloat16(tiny_clip_path):
    model, _ = load_clip(ModelConfig(model_name_or_path=str(tiny_clip_path), dtype="bfloat16"))
    assert model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    for part in (model.text_model, model.visual_projection, model.text_projection):
        assert {p.dtype for p in part.parameters()} == {torch.float32}


def test_workers_that_prepare_the_next_batches_give_the_serial_numbers(cifar_slice, tiny_clip_path, tmp_path):
    """preprocessing_num_workers decodes and preprocesses ahead of the tower: same rows, same order, same bytes,
    the same flags for an image that does not decode."""
    from datasets import Image

    source = load_dataset("parquet", data_files=str(cifar_slice), split="train").select(range(90))
    source = source.cast_column("img", Image(decode=False))
    broken = source[7]["img"] | {"bytes": b"not an image"}
    source = source.map(lambda row, i: {"img": broken if i == 7 else row["img"]}, with_indices=True)
    dataset = with_row_ids(source.cast_column("img", Image()))
    config = ModelConfig(model_name_or_path=str(tiny_clip_path))
    model, processor = load_clip(config)
    results = {}
    for workers in (0, 2):
        results[workers] = embed_images(
            dataset,
            "img",
            model,
            processor.image_processor,
            model_fingerprint(config, model),
            tmp_path / f"workers_{workers}",
            Accelerator(),
            batch_size=16,
            chunk_size=48,
            num_workers=workers,
        )
    serial, parallel = results[0], results[2]
    assert parallel["row_id"][:] == list(range(90))
    torch.testing.assert_close(pooled_matrix(parallel), pooled_matrix(serial), rtol=0, atol=0)
    for column in ("decode_ok", "decode_error", "noise_level", "contrast", "sharpness"):
        assert parallel[column][:] == serial[column][:], column
    assert not serial["decode_ok"][7] and serial["decode_error"][7].startswith("image failed to decode")


def test_jpeg_draft_embeds_the_drafted_pixels_in_caches_of_their_own(cifar_slice, tiny_clip_path, tmp_path):
    """jpeg_draft: the tower sees what the processor makes of the JPEG decoded at reduced scale (the tiny CLIP
    resizes to 32 px, so 128x96 JPEGs decode at 64x48), and the embeddings and pixel statistics of drafted decoding
    are cached apart from those of full decoding, which keep their names."""
    import io

    from datasets import Dataset, Features, Image
    from PIL import Image as PILImage

    from hf_clipsel.data import decode_rgb

    def jpeg(image) -> dict:
        buffer = io.BytesIO()
        image.convert("RGB").resize((128, 96), PILImage.BICUBIC).save(buffer, "JPEG", quality=90)
        return {"bytes": buffer.getvalue(), "path": None}

    fixture = load_dataset("parquet", data_files=str(cifar_slice), split="train").select(range(20))
    cells = [jpeg(image) for image in fixture["img"]]
    dataset = with_row_ids(Dataset.from_dict({"img": cells}, features=Features({"img": Image()})))
    config = ModelConfig(model_name_or_path=str(tiny_clip_path))
    model, processor = load_clip(config)
    kwargs = dict(cache_dir=tmp_path, accelerator=Accelerator(), batch_size=10, chunk_size=20)
    fingerprint = model_fingerprint(config, model)
    full = embed_images(dataset, "img", model, processor.image_processor, fingerprint, **kwargs)
    folders = {path.name for path in tmp_path.iterdir()}
    drafted = embed_images(dataset, "img", model, processor.image_processor, fingerprint, **kwargs, jpeg_draft=True)
    assert len({path.name for path in tmp_path.iterdir()} - folders) == 2, "drafted embeddings and statistics apart"
    again = embed_images(dataset, "img", model, processor.image_processor, fingerprint, **kwargs)
    assert again.to_dict() == full.to_dict(), "full decoding still reads its own caches"

    images = [decode_rgb(cell, draft_size=(32, 32))[0] for cell in cells]
    assert {image.size for image in images} == {(64, 48)}
    pixel_values = processor.image_processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        direct = vision_tower_outputs(model, pixel_values)
    torch.testing.assert_close(pooled_matrix(drafted), direct, rtol=0, atol=0)
    assert not torch.equal(pooled_matrix(drafted), pooled_matrix(full))
    assert drafted["noise_level"][:] != full["noise_level"][:], "the statistics are measured on the drafted pixels"

    # DataLoader workers, and a statistics-only pass (embeddings cached, statistics gone), decode drafted too.
    parallel = embed_images(
        dataset, "img", model, processor.image_processor, fingerprint, **{**kwargs, "cache_dir": tmp_path / "workers"},
        num_workers=2, jpeg_draft=True,
    )  # fmt: skip
    assert parallel.to_dict() == drafted.to_dict()
    for folder in (tmp_path / "workers").glob(STATISTICS_DIR_PREFIX + "*"):
        shutil.rmtree(folder)
    measured_again = embed_images(
        dataset, "img", model, processor.image_processor, fingerprint, **{**kwargs, "cache_dir": tmp_path / "workers"},
        jpeg_draft=True,
    )  # fmt: skip
    assert measured_again.to_dict() == drafted.to_dict()


def test_full_decoding_caches_keep_the_names_they_had_before_jpeg_draft():
    """Users' existing caches (often hours of embedding) must not be invalidated by the option's existence: with
    jpeg_draft off, the keys are those of the identities without a decoding field."""

    class Processor:
        def to_json_string(self):
            return "{}"

    identity = {"data": "fingerprint", "image_column": "img", "chunk_size": 4096}
    assert embedding.statistics_key("fingerprint", "img", 4096) == embedding._key(
        {"version": embedding.measurement_versions(), **identity}
    )
    assert embedding.cache_key("fingerprint", "img", "model", Processor(), 64, 4096) == embedding._key(
        {"version": embedding.CACHE_FORMAT_VERSION, **identity, "model": "model", "processor": "{}", "batch_size": 64}
    )
    assert embedding.statistics_key("fingerprint", "img", 4096, (224, 224)) != embedding.statistics_key(
        "fingerprint", "img", 4096
    )


def test_the_draft_target_is_what_the_processor_resizes_to():
    from transformers import CLIPImageProcessor

    from hf_clipsel.preprocessing import resize_target

    assert resize_target(CLIPImageProcessor()) == (224, 224)  # shortest edge 224
    assert resize_target(CLIPImageProcessor(size={"height": 96, "width": 128})) == (128, 96)
    assert resize_target(CLIPImageProcessor(do_resize=False)) is None  # nothing known: JPEGs decode at full scale


class _WorkerStamped(Preprocessing):
    """The processor's outputs plus the process that prepared them (a tensor, so that it travels with the batch)."""

    def prepare(self, images):
        return {**super().prepare(images), "prepared_by": torch.tensor([os.getpid()])}


def test_one_loader_serves_every_chunk_so_its_workers_start_once(cifar_slice, tiny_clip_path):
    """6 chunks of 2 batches, 2 workers: every batch of every chunk, of a loaded source and of a stream's cells alike,
    comes in order from the same two worker processes (a loader per chunk would start 12)."""
    from datasets import Image
    from transformers import AutoImageProcessor

    source = load_dataset("parquet", data_files=str(cifar_slice), split="train").select(range(96))
    source = with_row_ids(source).cast_column("img", Image(decode=False))
    preprocessing = _WorkerStamped(AutoImageProcessor.from_pretrained(tiny_clip_path))
    chunks = [source.select(range(start, start + 16)) for start in range(0, 96, 16)]
    serial = [prepare_batch(source[i : i + 8]["img"], preprocessing) for i in range(0, 96, 8)]
    for loader_source in (source, None):  # None: a stream's, whose tasks carry their cells
        work = (ChunkWork(i, rows, 16 * i, preprocess=True, measure=True) for i, rows in enumerate(chunks))
        workers, batches, order = set(), [], []
        for chunk, prepared in prepared_chunks(work, loader_source, "img", preprocessing, 8, num_workers=2):
            order.append(chunk.index)
            batches.extend(prepared)
        assert order == list(range(6))
        assert len(batches) == len(serial) == 12
        for ready, expected in zip(batches, serial):
            workers.add(int(ready["other_inputs"].pop("prepared_by")))
            assert torch.equal(ready["pixel_values"], expected["pixel_values"])
            assert ready["statistics"] == [list(row) for row in expected["statistics"]]  # the loader makes lists
        assert len(workers) == 2 and os.getpid() not in workers


def test_a_chunk_is_one_record_batch_in_its_cache_files(cifar_slice, tiny_clip_path, tmp_path):
    """Opening an Arrow file touches every record batch's header, and the kernel maps about 64 KiB around each for
    the whole run: at datasets' 1,000-row batches, about 70 bytes a row of each cache stay resident while scoring
    (recipes/benchmarks/README.md, "Where the per-row memory goes"). A chunk of 1,200 rows is one batch (up to a
    block of features, hf_clipsel.features.rows_per_block), in the embeddings' file and in the statistics'."""
    import pyarrow as pa

    dataset = load_dataset("parquet", data_files=str(cifar_slice), split="train")
    dataset = with_row_ids(dataset.select([row % len(dataset) for row in range(1200)]))
    config = ModelConfig(model_name_or_path=str(tiny_clip_path))
    model, processor = load_clip(config)
    kwargs = dict(model_fingerprint=model_fingerprint(config, model), cache_dir=tmp_path, accelerator=Accelerator(),
                  batch_size=200, chunk_size=1200)  # fmt: skip
    embed_images(dataset, "img", model, processor.image_processor, **kwargs)
    files = embedding_chunks(tmp_path) + sorted(tmp_path.glob(STATISTICS_DIR_PREFIX + "*/chunk-*.arrow"))
    assert len(files) == 2
    for path in files:
        with pa.memory_map(str(path)) as source:
            assert [batch.num_rows for batch in pa.ipc.open_stream(source)] == [1200], path.parent.name
