"""The whole run on a real CIFAR-10 slice with a tiny CLIP: every output, exact budgets, rows equal the source."""

import copy
import dataclasses
import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from datasets import Image, load_dataset
from peft import PeftModel
from transformers import CLIPModel

from hf_clipsel.configs import budget
from hf_clipsel.pipeline import run, select_from_scores
from hf_clipsel.selection import SgdOptions
from tests.conftest import run_config


def _image_bytes(dataset):
    return [cell["bytes"] for cell in dataset.cast_column("img", Image(decode=False))["img"]]


@pytest.fixture(scope="module")
def finished_run(cifar_slice, tiny_clip_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run")
    config = run_config(cifar_slice, tiny_clip_path, output_dir, selection_ratios=[0.3, 0.57])
    digest = hashlib.sha256(cifar_slice.read_bytes()).hexdigest()
    summary = run(config, command=["hf-clipsel", "run"])
    assert hashlib.sha256(cifar_slice.read_bytes()).hexdigest() == digest, "the source file was modified"
    return config, output_dir, summary


def test_every_output_is_written(finished_run):
    _, output_dir, summary = finished_run
    for name in (
        "README.md",
        "run_config.yaml",
        "run_summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (output_dir / name).exists(), name
    assert sorted(p.name for p in (output_dir / "subsets").iterdir()) == ["ratio_0.3", "ratio_0.57"]
    assert len(list((output_dir / "scores").glob("scores-*.parquet"))) == 1
    saved = yaml.safe_load((output_dir / "run_config.yaml").read_text())
    assert saved["selection_ratios"] == [0.3, 0.57]
    assert {"torch", "transformers", "datasets", "peft", "accelerate"} <= set(saved["versions"])
    assert summary.num_rows == 240 and summary.num_flagged == 0


def test_the_cards_snippet_names_the_folder_a_user_loads_from(finished_run):
    """It was rendered in the staging folder, which is gone once the run is committed: copied, it must work."""
    _, output_dir, _ = finished_run
    card = (output_dir / "README.md").read_text()
    assert f'load_dataset("{output_dir}", "ratio_0.3", split="train")' in card
    assert ".staging-" not in card
    snippet = card.split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(snippet, namespace)  # the card's own snippet, as a user would paste it
    assert len(namespace["subset_0_3"]) == 72 and len(namespace["scores"]) == 240


def test_scores_are_keyed_by_row_id_with_every_column(finished_run):
    _, output_dir, _ = finished_run
    scores = load_dataset(str(output_dir), "scores", split="train")
    assert scores["row_id"][:] == list(range(240))
    source = load_dataset("parquet", data_files=finished_run[0].data.dataset_name, split="train")
    assert scores["label"][:] == source["label"][:]
    assert scores.features["label"].names == source.features["label"].names
    for column in ("semantic_alignment_normalized", "sample_diversity_normalized"):
        values = np.asarray(scores[column][:])
        assert values.min() == 0.0 and values.max() == 1.0
    for name in (
        "decode_ok",
        "flag_reason",
        "semantic_alignment",
        "sample_diversity",
        "reward_ratio_0.3",
        "is_selected_ratio_0.3",
        "reward_ratio_0.57",
        "is_selected_ratio_0.57",
    ):
        assert name in scores.column_names


def test_subsets_have_the_exact_budget_and_equal_the_source_rows(finished_run):
    config, output_dir, _ = finished_run
    source = load_dataset("parquet", data_files=config.data.dataset_name, split="train")
    scores = load_dataset(str(output_dir), "scores", split="train")
    for ratio in (0.3, 0.57):
        subset = load_dataset(str(output_dir), f"ratio_{ratio:g}", split="train")
        assert len(subset) == budget(ratio, 240)
        selected = np.nonzero(np.asarray(scores[f"is_selected_ratio_{ratio:g}"][:]))[0].tolist()
        assert subset["row_id"][:] == selected
        expected = source.select(selected)
        assert subset.features["label"] == source.features["label"]
        assert subset["label"][:] == expected["label"][:]
        assert _image_bytes(subset) == _image_bytes(expected)


def test_exact_selection_keeps_the_largest_rewards(finished_run):
    _, output_dir, _ = finished_run
    scores = load_dataset(str(output_dir), "scores", split="train")
    reward = np.asarray(scores["reward_ratio_0.3"][:])
    selected = np.asarray(scores["is_selected_ratio_0.3"][:])
    assert reward[selected].min() >= reward[~selected].max()
    # a larger ratio keeps every row of a smaller one (alpha is fixed)
    assert (np.asarray(scores["is_selected_ratio_0.57"][:]) >= selected).all()


def test_adapter_loads_with_peft(finished_run, tiny_clip_path):
    _, output_dir, _ = finished_run
    model = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), str(output_dir / "adapter"))
    assert model.peft_config["default"].target_modules == {"visual_projection", "text_projection"}


def test_select_again_from_saved_scores_without_a_model(finished_run, tmp_path):
    config, output_dir, _ = finished_run
    config = copy.deepcopy(config)
    scores = load_dataset(str(output_dir), "scores", split="train")
    config.run.output_dir = str(tmp_path)
    config.selection.selection_ratios = [0.3]
    summary = select_from_scores(config, scores=scores)
    again = load_dataset(str(tmp_path), "scores", split="train")
    assert again["is_selected_ratio_0.3"][:] == scores["is_selected_ratio_0.3"][:]
    assert summary.ratios["0.3"].kept == budget(0.3, 240)


def test_select_at_a_new_ratio_adds_it_to_the_finished_run(finished_run, tmp_path):
    config, output_dir, _ = finished_run
    copy_dir = tmp_path / output_dir.name
    shutil.copytree(output_dir, copy_dir)
    config = copy.deepcopy(config)
    config.run.output_dir = str(copy_dir)
    config.selection.selection_ratios = [0.4]
    summary = select_from_scores(config, command=["hf-clipsel", "select", "--selection_ratios", "0.4"])
    assert sorted(summary.ratios) == ["0.3", "0.4", "0.57"]
    before = pd.read_parquet(output_dir / "scores")
    after = pd.read_parquet(copy_dir / "scores")
    for ratio in ("0.3", "0.57"):  # the earlier subsets are the same rows
        assert after[f"is_selected_ratio_{ratio}"].equals(before[f"is_selected_ratio_{ratio}"])
    assert after["is_selected_ratio_0.4"].sum() == budget(0.4, 240)
    assert yaml.safe_load((copy_dir / "run_config.yaml").read_text())["selection_ratios"] == [0.3, 0.4, 0.57]
    config.selection.selection_ratios = [0.5]
    config.selection.alpha = 0.7  # another setting too: refused, and the message says where selecting again works
    with pytest.raises(FileExistsError, match="other settings \\(alpha, selection_ratios\\).*--scores_from"):
        select_from_scores(config)


def test_select_from_saved_scores_keeps_the_dataset_it_was_given(finished_run, tmp_path):
    config, output_dir, _ = finished_run
    config = copy.deepcopy(config)
    config.run.output_dir = str(tmp_path / "again")
    config.run.scores_from = str(output_dir)
    select_from_scores(config)
    saved = yaml.safe_load((tmp_path / "again" / "run_config.yaml").read_text())
    assert saved["dataset_name"] == config.data.dataset_name
    assert "datasets/unknown" not in (tmp_path / "again" / "README.md").read_text()


def test_load_dataset_reads_a_rerun_not_the_cached_first_run(finished_run, tmp_path):
    # datasets caches a folder's YAML configs by their patterns: the shard names carry a digest of their bytes
    config, output_dir, _ = finished_run
    copy_dir = tmp_path / output_dir.name
    shutil.copytree(output_dir, copy_dir)
    before = load_dataset(str(copy_dir), "ratio_0.3", split="train")["row_id"][:]
    config = copy.deepcopy(config)
    config.run.output_dir = str(copy_dir)
    config.selection.selection_ratios = [0.3]
    config.selection.alpha = 5.0  # a diversity-heavy, ungated reward: another subset of the same size
    config.selection.diversity_gate = "none"
    config.run.overwrite_output_dir = True  # another selection replaces this one only when asked
    select_from_scores(config, scores=load_dataset(str(output_dir), "scores", split="train"))
    after = load_dataset(str(copy_dir), "ratio_0.3", split="train")["row_id"][:]
    assert len(after) == len(before) and after != before
    assert (
        after
        == load_dataset(str(copy_dir), "scores", split="train").filter(lambda row: row["is_selected_ratio_0.3"])[
            "row_id"
        ][:]
    )


def test_rerun_with_other_settings_refuses_to_replace_results(finished_run):
    config, output_dir, _ = finished_run
    changed = run_config(config.data.dataset_name, config.model.model_name_or_path, output_dir, knn_k=3)
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        run(changed)


@pytest.mark.parametrize("method", ["sgd", "random", "clip_score", "ccs"])
def test_other_selectors_run_from_saved_scores(finished_run, tmp_path, method):
    config, output_dir, _ = finished_run
    config = copy.deepcopy(config)
    config.run.output_dir = str(tmp_path)
    options = SgdOptions(sgd_exact_trim=True) if method == "sgd" else None
    config.selection = dataclasses.replace(config.selection, selection_method=method, options=options)
    summary = select_from_scores(config, scores=load_dataset(str(output_dir), "scores", split="train"))
    for ratio, k in (("0.3", 72), ("0.57", 136)):
        assert summary.ratios[ratio].kept == k
        assert summary.ratios[ratio].diagnostics["budget"] == k
    if method == "sgd":
        assert summary.ratios["0.3"].diagnostics["iterations"] > 0
    # the reward is written only by the methods that rank by it: a baseline's column would claim an order it ignored
    columns = load_dataset(str(tmp_path), "scores", split="train").column_names
    assert ("reward_ratio_0.3" in columns) == (method == "sgd"), columns
    assert "is_selected_ratio_0.3" in columns


def test_moderate_from_saved_scores_is_refused_before_any_work(finished_run, tmp_path):
    config, _, _ = finished_run
    config = copy.deepcopy(config)
    config.run.output_dir = str(tmp_path / "moderate")
    config.data.dataset_name = str(tmp_path / "not_even_loaded.parquet")
    config.selection.selection_method = "moderate"
    with pytest.raises(ValueError, match="image features, which saved scores do not hold"):
        select_from_scores(config)
    assert not (tmp_path / "moderate").exists()


def test_the_summary_and_report_show_how_stable_the_selection_is_across_ratios(finished_run, tmp_path):
    config, output_dir, summary = finished_run
    from hf_clipsel.summary import RunSummary

    scores = load_dataset(str(output_dir), "scores", split="train")
    small, large = np.asarray(scores["is_selected_ratio_0.3"]), np.asarray(scores["is_selected_ratio_0.57"])
    expected = (small & large).sum() / small.sum()
    assert RunSummary.read(output_dir).ratio_overlap == {"0.3->0.57": pytest.approx(expected)}
    assert "stability: kept at 0.3, kept at 0.57 too" in (output_dir / "report" / "index.html").read_text()


def test_stability_across_adapter_seeds_is_the_overlap_with_runs_trained_on_those_seeds(
    cifar_slice, tiny_clip_path, tmp_path
):
    """stability_seeds 2 retrains the adapters with seeds 1 and 2; the summary's share is the mean overlap of the
    run's kept sets with those of separate runs made with seeds 1 and 2."""
    from hf_clipsel.summary import RunSummary

    # adapters always kept, and trained hard enough that the seed moves the ranking
    forced = dict(adapter_holdout_fraction=0.0, adapter_epochs=5, adapter_learning_rate=0.01)
    run(run_config(cifar_slice, tiny_clip_path, tmp_path / "main", stability_seeds=2, **forced))
    kept = {}
    for seed in (1, 2):
        run(run_config(cifar_slice, tiny_clip_path, tmp_path / f"seed{seed}", seed=seed, **forced))
        kept[seed] = load_dataset(str(tmp_path / f"seed{seed}"), "scores", split="train")
    main = load_dataset(str(tmp_path / "main"), "scores", split="train")
    expected = {}
    for ratio in ("0.3", "0.5"):
        mine = np.asarray(main[f"is_selected_ratio_{ratio}"])
        shares = [(mine & np.asarray(kept[s][f"is_selected_ratio_{ratio}"])).sum() / mine.sum() for s in (1, 2)]
        expected[ratio] = pytest.approx(float(np.mean(shares)))
    summary = RunSummary.read(tmp_path / "main")
    assert summary.seed_overlap == expected
    assert min(summary.seed_overlap.values()) < 1, "with adapters forced on, another seed keeps other rows"
    report = (tmp_path / "main" / "report" / "index.html").read_text()
    assert "stability: kept at 0.3 with adapters trained on other seeds" in report


def test_stability_seeds_need_projection_adapters_trained_here():
    from hf_clipsel.configs import AdapterConfig

    with pytest.raises(ValueError, match="stability_seeds retrains the projection adapters"):
        AdapterConfig(adapter_preset="none", stability_seeds=2)


def test_the_card_says_zero_shot_when_the_adapters_fell_back(finished_run, tmp_path):
    """Issue 29: the card claimed an adapted model after the held-out check had set the adapters aside."""
    import json

    from hf_clipsel.cards import render_dataset_card

    _, output_dir, _ = finished_run
    copy_dir = tmp_path / "run"
    shutil.copytree(output_dir, copy_dir)
    summary = json.loads((copy_dir / "run_summary.json").read_text())
    for fell_back, expected in ((True, "a zero-shot CLIP-family model"), (False, "an adapted CLIP-family model")):
        summary["adapter_check"] = {**(summary.get("adapter_check") or {}), "fell_back": fell_back}
        (copy_dir / "run_summary.json").write_text(json.dumps(summary))
        card = str(render_dataset_card(copy_dir))
        assert expected in card
        assert ("set aside" in card) == fell_back
