"""The duplicate score: copies are grouped, a selection keeps one per group and label, and the copies of an image
under several labels are flagged (hf_clipsel.duplicates, hf_clipsel.scores.duplicate)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import CIFAR10, run_config

from hf_clipsel import pipeline
from hf_clipsel.core.names import drop_reason_column, selected_column
from hf_clipsel.duplicates import DUPLICATE_SIMILARITY, find_duplicates, groups_of_pairs
from hf_clipsel.runs.load import read_scores
from hf_clipsel.scores import SCORES
from hf_clipsel.scores.duplicate import duplicate_findings
from hf_clipsel.summary import RunSummary


def synthetic(num_rows=90, dim=32, classes=3, seed=0):
    """Features of distinct images (random directions around their class's) and the class text features."""
    generator = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(classes, dim, generator=generator), dim=-1)
    labels = torch.arange(num_rows) % classes
    features = torch.randn(num_rows, dim, generator=generator) + 2 * text[labels]
    return features, text, labels


def test_look_alikes_each_close_to_the_next_do_not_chain_into_one_group():
    """Connected components joined the demo's 8x8 digits into a group of 30 rows under 6 labels, each row close to
    the next only; a group is a centre and the rows paired with it directly."""
    chain = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]])
    group = groups_of_pairs(chain, 8)
    assert list(group) == [0, 0, 0, 3, 3, -1, -1, -1]  # centres 1, then 3 (row 5 pairs only with 4, taken)
    star = np.array([[5, 2], [5, 6], [6, 2], [7, 5]])  # row 5 pairs with every other: one group
    assert list(groups_of_pairs(star, 8)) == [-1, -1, 2, -1, -1, 2, 2, 2]


def test_copies_are_grouped_within_and_across_classes():
    features, text, labels = synthetic()
    features[30] = features[0] * 3.0  # an exact copy (scaled: the cosine ignores the norm), same class
    features[60] = features[0] + 0.01 * torch.randn(32)  # a near copy, same class: a group of three
    features[32] = features[4] + 0.01 * torch.randn(32)  # a near copy filed under another class (4 % 3 != 32 % 3)
    valid = torch.ones(90, dtype=torch.bool)
    valid[89] = False
    features[89] = features[7]  # an unusable row is nobody's duplicate
    found = find_duplicates(features, text, labels, valid)
    group = found["group"]
    assert group[0] == group[30] == group[60] == 0
    assert group[4] == group[32] == 4
    assert (group >= 0).sum() == 5, "distinct images must not be joined"
    assert group[7] == -1 and group[89] == -1 and found["same_class"][89] == -1
    assert found["same_class"][30] == pytest.approx(1.0, abs=1e-5)
    assert found["other_class"][32] >= DUPLICATE_SIMILARITY > found["same_class"][32]
    assert found["nearest"][32] == 4 and found["nearest"][30] in (0, 60) and found["nearest"][1] == -1

    preference = np.zeros(90)
    preference[60] = 1.0  # the best copy of group 0
    usable = valid.numpy()
    duplicate, conflict = duplicate_findings(group, labels.numpy(), preference, usable, keep_preferred_label=False)
    assert duplicate[0] == duplicate[30] == "duplicate: row 60 kept" and duplicate[60] == ""
    assert (duplicate != "").sum() == 2
    assert conflict[4] == "conflicting labels: row 32 is labelled 2"
    assert conflict[32] == "conflicting labels: row 4 is labelled 1"
    assert (conflict != "").sum() == 2
    preference[32] = 1.0  # the model prefers row 31's label: keeping the preferred copy flags row 4 only
    _, conflict = duplicate_findings(group, labels.numpy(), preference, usable, keep_preferred_label=True)
    assert conflict[31] == "" and conflict[4] == "conflicting labels: row 32 is labelled 2"


def test_a_class_larger_than_one_block_and_wider_than_the_sketch_finds_its_copies(monkeypatch):
    from hf_clipsel import duplicates

    monkeypatch.setattr(duplicates, "_BLOCK_ELEMENTS", 200 * 16 * 128)  # blocks of 2 query rows
    features, text, labels = synthetic(num_rows=100, dim=128)  # wider than the sketch: candidates, then exact cosines
    features[99] = features[0]
    features[33] = features[3] + 0.02 * torch.randn(128)
    found = find_duplicates(features, text, labels, torch.ones(100, dtype=torch.bool))
    assert found["group"][99] == found["group"][0] == 0 and found["group"][33] == found["group"][3] == 3
    assert (found["group"] >= 0).sum() == 4
    assert found["same_class"][99] == pytest.approx(1.0, abs=1e-5)
    assert found["nearest"][33] == 3 and found["same_class"][33] > DUPLICATE_SIMILARITY


@pytest.fixture(scope="module")
def pool_with_copies(cifar_slice, tmp_path_factory):
    """100 of the fixture's rows and five exact copies appended: three in their original's class, two under another."""
    table = pq.read_table(cifar_slice).slice(0, 100)
    within, across = [3, 17, 42], [5, 88]
    copies = table.take(within + across).to_pydict()
    copies["label"] = [*copies["label"][:3], *[(label + 1) % 10 for label in copies["label"][3:]]]
    import pyarrow as pa

    pool = pa.concat_tables([table, pa.Table.from_pydict(copies, schema=table.schema)])
    path = tmp_path_factory.mktemp("duplicates") / "pool.parquet"
    pq.write_table(pool, path)
    return path, within, across


def test_a_run_keeps_one_copy_and_flags_conflicting_labels(pool_with_copies, tiny_clip_path, tmp_path):
    path, within, across = pool_with_copies
    config = run_config(
        path, tiny_clip_path, tmp_path / "run", adapter_preset="none", selection_ratios=[0.9], duplicate_check=True
    )
    pipeline.run(config)
    table = read_scores(tmp_path / "run").with_format("numpy")[:]
    assert table["duplicate_group"].dtype == np.int64 and table["nearest_duplicate"].dtype == np.int64
    for column in (c.name for score in ("duplicate", "conflicting_labels") for c in SCORES[score].columns):
        assert column in table
    group, kept, reasons = table["duplicate_group"], table[selected_column(0.9)], table[drop_reason_column(0.9)]
    for copy, original in enumerate(within, start=100):
        assert group[copy] == group[original] >= 0
        assert int(kept[copy]) + int(kept[original]) == 1, "one copy of a group is kept at 0.9"
        dropped = copy if not kept[copy] else original
        assert reasons[dropped] == "duplicate"
        assert table["duplicate"][dropped] == f"duplicate: row {copy if dropped == original else original} kept"
    for copy, original in enumerate(across, start=103):
        assert group[copy] == group[original] >= 0 and table["nearest_duplicate"][copy] == original
        assert table["conflicting_labels"][copy].startswith("conflicting labels: row ")
        assert not kept[copy] and not kept[original], "neither label of a conflicting copy is kept"
        assert reasons[copy] == reasons[original] == "conflicting labels"
    summary = RunSummary.read(tmp_path / "run")
    # the copies and nothing else: the pixel thumbnails keep the tiny random CLIP's look-alikes apart
    assert summary.flags["conflicting_labels"]["conflicting labels"] == 4
    assert summary.flags["duplicate"]["duplicate"] == 3
    assert summary.duplicate_groups["groups"] == 5 and summary.duplicate_groups["largest"][0]["rows"] == 2
    report = (tmp_path / "run" / "report" / "index.html").read_text()
    for entry in summary.duplicate_groups["largest"]:  # each of the largest groups shown, its rows side by side
        gallery = report.split(f'id="duplicate-group-{entry["group"]}"', 1)[1].split("</div>\n", 1)[0]
        assert gallery.count("data-row-id=") == min(entry["rows"], 6)
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"{summary.duplicate_groups['groups']} near-duplicate groups" in card


def test_two_processes_split_the_search_and_get_the_values_of_one():
    import threading

    from hf_clipsel.features import Share

    features, text, labels = synthetic(num_rows=120, classes=4)
    features[50] = features[2] + 0.01 * torch.randn(32)  # copies within and across classes
    features[61] = features[9] * 2.0
    valid = torch.ones(120, dtype=torch.bool)
    alone = find_duplicates(features, text, labels, valid)
    barrier, parts, results, calls = threading.Barrier(2), [None, None], [None, None], [[], []]

    def process(index: int) -> None:
        def gather(part: list) -> list:  # an all-gather between the two threads
            calls[index].append(len(part))
            parts[index] = part
            barrier.wait()
            everything = parts[0] + parts[1]
            barrier.wait()
            return everything

        results[index] = find_duplicates(features, text, labels, valid, share=Share(index, 2, gather))

    threads = [threading.Thread(target=process, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(0 < mine < 4 for process_calls in calls for mine in process_calls), calls  # each did a part
    for result in results:
        for name, values in alone.items():
            np.testing.assert_array_equal(result[name], values, err_msg=name)


def test_thumbnails_join_resized_recoded_and_recoloured_copies_and_not_look_alikes():
    import io

    from PIL import Image

    from hf_clipsel.thumbnails import thumbnail

    rng = np.random.default_rng(0)
    # smooth random images (distinct layouts), 48 px: what a small photo's grey levels look like at 8x8
    images = [
        Image.fromarray(np.kron(rng.integers(0, 256, (6, 6, 3)), np.ones((8, 8, 1))).astype(np.uint8))
        for _ in range(12)
    ]
    buffer = io.BytesIO()
    images[1].save(buffer, format="JPEG", quality=60)
    copies = [
        images[0].resize((61, 61), Image.BICUBIC),  # row 12: resized copy of row 0
        Image.open(buffer).convert("RGB"),  # row 13: JPEG copy of row 1
        Image.fromarray((np.asarray(images[2]) * [0.9, 1.0, 1.1]).clip(0, 255).astype(np.uint8)),  # 14: of row 2
        images[3].copy(),  # row 15: exact copy of row 3, whose features will disagree (a look-alike)
    ]
    grids = torch.tensor([thumbnail(image) for image in images + copies] + [thumbnail(None)], dtype=torch.uint8)
    assert grids.shape == (17, 64) and int(grids[16].sum()) == 0
    features, text, _ = synthetic(num_rows=17, classes=1)
    features[12:15] = features[0:3]  # the copies' features agree with their originals'
    labels, valid = torch.zeros(17, dtype=torch.int64), torch.ones(17, dtype=torch.bool)
    valid[16] = False
    found = find_duplicates(features, text, labels, valid, thumbnails=grids)
    group = found["group"]
    assert [group[row] for row in (12, 13, 14)] == [0, 1, 2] and list(group[:3]) == [0, 1, 2]
    assert group[3] == group[15] == -1, "the same pixels with features that disagree are no duplicate"
    assert (group >= 0).sum() == 6 and found["nearest"][12] == 0 and found["same_class"][13] >= 0.97
    none = find_duplicates(features[:12], text, labels[:12], valid[:12], thumbnails=grids[:12])  # distinct only
    assert (none["group"] == -1).all() and (none["nearest"] == -1).all()


def test_the_cross_class_search_of_a_few_queries_finds_what_the_full_search_finds():
    from hf_clipsel.duplicates import nearest_across, nearest_in_group
    from hf_clipsel.thumbnails import thumbnail_vectors

    generator = torch.Generator().manual_seed(1)
    labels = torch.where(
        torch.rand(300, generator=generator) < 0.8, 0, torch.randint(1, 4, (300,), generator=generator)
    )
    vectors = thumbnail_vectors(torch.randint(0, 256, (300, 64), generator=generator, dtype=torch.uint8))
    vectors[torch.arange(0, 300, 10)] = vectors[torch.arange(5, 300, 10)]  # copies, some under other labels
    full, few = nearest_in_group(vectors, labels, 0.97), nearest_across(vectors, labels, 0.97)
    torch.testing.assert_close(few[0], full[0])
    assert {tuple(sorted(pair)) for pair in few[2].tolist()} == {tuple(sorted(pair)) for pair in full[2].tolist()}
    assert len(few[2]) > 0
    near = full[0] >= 0.97
    torch.testing.assert_close((vectors * vectors[few[1]]).sum(1)[near], full[0][near])
    # positions only where asked (crop candidates: nearest_from), each of another label and at the cosine reported
    similarity, neighbour, _ = nearest_across(vectors, labels, 0.97, nearest_from=0.3)
    torch.testing.assert_close(similarity, full[0])
    asked = similarity >= 0.3
    assert (
        asked.any()
        and (~asked).any()
        and bool((neighbour[asked] >= 0).all())
        and bool((neighbour[~asked] == -1).all())
    )
    assert bool((labels[neighbour[asked]] != labels[asked]).all())
    torch.testing.assert_close((vectors[asked] * vectors[neighbour[asked]]).sum(1), similarity[asked])


def test_thumbnails_read_from_the_class_sorted_store_give_what_the_grids_in_memory_give(tmp_path):
    """The score stage keeps the thumbnails in a uint8 store beside the features, sorted by the features' classes,
    not in memory; the search reads them by row ids, a class at a time (here another grouping than the store's,
    so its reads are scattered), and finds the same values."""
    from hf_clipsel.features import FeatureStore

    features, text, labels = synthetic(num_rows=120, classes=3, seed=3)
    grids = torch.randint(0, 256, (120, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    grids[40:50], features[40:50] = grids[0:10], features[0:10]  # copies, within and across labels
    valid = torch.ones(120, dtype=torch.bool)
    valid[7] = False
    expected = find_duplicates(features, text, labels, valid, thumbnails=grids)
    assert (expected["group"] >= 0).sum() >= 18
    order = FeatureStore((labels.numpy() * 7 + np.arange(120)) % 5, 32)  # the features' store: another order
    store = FeatureStore(order, 64, tmp_path / "thumbnails.bin", dtype=np.uint8)
    assert store.order is order.order and store.block_rows == 48 * 1024**2 // 64
    for start in range(0, 120, 7):
        store.write(start, grids[start : start + 7].numpy())
    found = find_duplicates(features, text, labels, valid, thumbnails=store)
    for name, values in expected.items():
        np.testing.assert_array_equal(found[name], values, err_msg=name)


def test_the_findings_of_a_selection_go_with_its_table():
    """Both duplicate scores' flags come from one search per (table, selection), cached: the cache must not hold its
    two object arrays of N after the table it was computed from is gone (16 bytes a row at the selection's end)."""
    import gc

    from hf_clipsel.scores import duplicate
    from hf_clipsel.selection import SelectionConfig

    table = {
        "duplicate_group": np.array([0, 0, -1, 3, 3], dtype=np.int64),
        "label": np.array([1, 1, 0, 0, 1], dtype=np.int64),
        "flag_reason": np.array([""] * 5, dtype=object),
        "semantic_alignment_normalized": np.array([0.9, 0.5, 0.2, 0.4, 0.8], dtype=np.float32),
        "class_posterior_normalized": np.array([0.9, 0.5, 0.2, 0.4, 0.8], dtype=np.float32),
    }
    selection = SelectionConfig(duplicate_check=True)
    duplicates, conflicts = duplicate.findings(table, selection)
    assert list(duplicates) == ["", "duplicate: row 0 kept", "", "", ""]
    assert conflicts[3].startswith("conflicting labels") and duplicate.findings(table, selection)[0] is duplicates
    del table
    gc.collect()
    assert duplicate._LAST.found is None and duplicate._LAST.references is None


def test_a_group_larger_than_the_bound_is_searched_in_cells_and_still_finds_its_copies():
    """A class (or predicted class) above ``group_rows`` rows is searched in k-means cells, so the search is linear
    in N; copies share their cell, and a cell finds nothing the whole search would not."""
    from hf_clipsel.partition import cells
    from hf_clipsel.thumbnails import thumbnail_vectors

    generator = torch.Generator().manual_seed(4)
    grids = torch.randint(0, 256, (1200, 64), generator=generator, dtype=torch.uint8)
    grids[600:640] = grids[0:40]  # exact copies
    grids[640:660] = (grids[40:60].to(torch.int16) + torch.randint(-3, 4, (20, 64), generator=generator)).clamp(
        0, 255
    )  # near copies
    grids[1100:] = 0  # blank rows: all alike, never split
    labels = torch.zeros(1200, dtype=torch.int64)
    labels[640:650] = 1  # near copies under another label: the cross-class (predicted class) search
    features, text, _ = synthetic(num_rows=1200, classes=2, seed=5)
    features[600:660] = features[0:60]
    text = F.normalize(torch.ones(2, 32), dim=-1)  # one predicted class for every row: a group of 1,200
    valid = torch.ones(1200, dtype=torch.bool)

    parts = cells(thumbnail_vectors(grids), 100)
    assert sorted(torch.cat(parts).tolist()) == list(range(1200)), "every row in exactly one cell"
    blank = [part for part in parts if (part >= 1100).any()]
    assert len(blank) == 1 and (blank[0] >= 1100).sum() == 100, "identical rows cannot be divided: one cell"
    assert all(part.numel() <= 100 for part in parts if part is not blank[0]), "other cells: at most the bound"

    whole = find_duplicates(features, text, labels, valid, thumbnails=grids, group_rows=10_000)
    split = find_duplicates(features, text, labels, valid, thumbnails=grids, group_rows=100)
    assert (whole["group"][600:660] >= 0).all()
    np.testing.assert_array_equal(split["group"][:60], whole["group"][:60])  # every copy found in its cell
    np.testing.assert_array_equal(split["group"][600:660], whole["group"][600:660])
    assert (split["same_class"] <= whole["same_class"] + 1e-6).all()  # a cell's nearest is never nearer
    assert (split["same_class"] < whole["same_class"] - 1e-3).sum() > 100, "the cells were searched apart"
    assert (split["other_class"] <= whole["other_class"] + 1e-6).all()


def test_a_cropped_copy_is_found_by_the_alignment_of_its_boxes_and_a_distinct_image_is_not():
    """A crop of 90% at a corner moves the 8x8 grid below the threshold; each row's nearest row is verified on the
    16x16 grids: the crop's whole grid matches one of its original's crop boxes, a distinct image's does not."""
    import io

    from PIL import Image

    from hf_clipsel.duplicates import THUMBNAIL_SIMILARITY
    from hf_clipsel.thumbnails import CROP_SIDE, crop_alignment, crop_views, thumbnail, thumbnail_vectors

    table = pq.read_table(CIFAR10 / "train-00000-of-00001.parquet", columns=["img"]).slice(0, 40)
    images = [Image.open(io.BytesIO(cell["bytes"])).convert("RGB") for cell in table.column("img").to_pylist()]
    crops = [images[0].crop((3, 0, 32, 29)), images[3].crop((0, 0, 29, 29))]  # rows 40, 41: 29 of 32 px a side
    everything = images + crops
    grids = torch.tensor([thumbnail(image) for image in everything], dtype=torch.uint8)
    fine = torch.tensor([thumbnail(image, CROP_SIDE) for image in everything], dtype=torch.uint8)
    vectors = thumbnail_vectors(grids)
    assert (vectors[[40, 41]] * vectors[[0, 3]]).sum(1).max() < THUMBNAIL_SIMILARITY, "the 8x8 grids alone miss it"
    views = crop_views(fine)
    assert views.shape == (42, 28, 64)
    pairs = torch.tensor([[0, 40], [3, 41], [0, 2], [5, 40]])
    alignment = crop_alignment(fine[pairs[:, 0]], fine[pairs[:, 1]])
    assert alignment[:2].min() >= 0.96 and alignment[2:].max() < 0.9, alignment
    # either way round, and in chunks of any size: the same scores as the views compared whole
    first, second = views[pairs[:, 0]], views[pairs[:, 1]]
    whole = torch.maximum(
        (first @ second[:, -1, :, None]).amax(dim=(1, 2)), (second @ first[:, -1, :, None]).amax(dim=(1, 2))
    )
    torch.testing.assert_close(alignment, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        crop_alignment(fine[pairs[:, 1]], fine[pairs[:, 0]], chunk_rows=3), whole, rtol=0, atol=1e-6
    )
    # screened (the threshold given): the crops keep their full score, the others a lower bound of it
    screened = crop_alignment(fine[pairs[:, 0]], fine[pairs[:, 1]], at_least=0.96)
    torch.testing.assert_close(screened[:2], whole[:2], rtol=0, atol=1e-6)
    assert (screened[2:] <= whole[2:] + 1e-6).all() and (screened[2:] < 0.96 - 0.07).all()

    features, text, _ = synthetic(num_rows=42, classes=1)
    features[40:42] = features[[0, 3]] + 0.1 * torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    labels, valid = torch.zeros(42, dtype=torch.int64), torch.ones(42, dtype=torch.bool)
    labels[41] = 1  # the second crop under another label: found by the cross-class search
    text = torch.cat([text, F.normalize(torch.randn(1, 32, generator=torch.Generator().manual_seed(6)), dim=-1)])
    found = find_duplicates(features, text, labels, valid, thumbnails=grids, crop_thumbnails=fine)
    assert found["group"][40] == found["group"][0] == 0 and found["nearest"][40] == 0
    assert found["group"][41] == found["group"][3] == 3
    assert (np.delete(found["group"][:40], [0, 3]) == -1).all(), "no distinct image of the fixture joins a group"
    without = find_duplicates(features, text, labels, valid, thumbnails=grids)
    assert (without["group"] == -1).all()


def test_duplicate_crops_finds_a_cropped_copy_and_a_default_run_does_not(cifar_slice, tiny_clip_path, tmp_path):
    """The scoring setting (off by default) reaches the score: the embed stage measured the 16x16 thumbnails, the
    score stage read them from their store, and the crop (8x8 cosine below the threshold) joins its original's
    group; by default it does not."""
    import io

    import pyarrow as pa
    from PIL import Image

    table = pq.read_table(cifar_slice).slice(0, 60)
    image = Image.open(io.BytesIO(table.column("img")[0].as_py()["bytes"])).convert("RGB")
    buffer = io.BytesIO()
    image.crop((3, 0, 32, 29)).save(buffer, format="PNG")
    copy = table.slice(0, 1).to_pydict()
    copy["img"] = [{"bytes": buffer.getvalue(), "path": None}]
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.concat_tables([table, pa.Table.from_pydict(copy, schema=table.schema)]), path)
    settings = {"adapter_preset": "none", "selection_ratios": [0.9], "duplicate_check": True}
    pipeline.run(run_config(path, tiny_clip_path, tmp_path / "run", duplicate_crops=True, **settings))
    found = read_scores(tmp_path / "run").with_format("numpy")[:]
    assert found["duplicate_similarity_same_class"][60] < 0.97, "the 8x8 thumbnails alone do not join them"
    assert found["duplicate_group"][60] == found["duplicate_group"][0] == 0 and found["nearest_duplicate"][60] == 0
    assert (found["duplicate_group"][1:60] == -1).all()
    pipeline.run(run_config(path, tiny_clip_path, tmp_path / "off", **settings))  # the default: no crop search
    assert (read_scores(tmp_path / "off").with_format("numpy")["duplicate_group"][:] == -1).all()


def test_the_search_groups_rows_by_the_predicted_classes_the_score_stage_gives():
    """The score stage computes each row's predicted class once (N x C x d, at 1000 classes the search's costliest
    product) and hands it to the search: the same values as the search's own prediction, and the ones it uses."""
    features, text, labels = synthetic(num_rows=120, classes=3, seed=3)
    grids = torch.randint(0, 256, (120, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    grids[40:50], features[40:50] = grids[0:10], features[0:10]  # copies, some under another label
    valid = torch.ones(120, dtype=torch.bool)
    alone = find_duplicates(features, text, labels, valid, thumbnails=grids)
    predicted = (F.normalize(features, dim=-1) @ text.T).argmax(dim=-1)
    given = find_duplicates(features, text, labels, valid, thumbnails=grids, predicted_classes=predicted)
    for name, values in alone.items():
        np.testing.assert_array_equal(given[name], values, err_msg=name)
    assert (alone["other_class"] > -1).sum() > 0
    apart = find_duplicates(features, text, labels, valid, thumbnails=grids, predicted_classes=labels)
    assert (apart["other_class"] == -1).all(), "each predicted class holds one label: no row of another"
