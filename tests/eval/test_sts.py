from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from protorkd.errors import UsageError
from protorkd.eval.sts import STS_TASKS, evaluate, load_semeval, present_tasks, score_pairs, spearman
from tests.conftest import shared_data


def test_spearman_of_a_known_ranking():
    gold = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(np.array([0.1, 0.2, 0.3, 0.4, 0.9]), gold) == pytest.approx(100.0)
    assert spearman(-gold, gold) == pytest.approx(-100.0)
    # one swapped neighbour pair: rho = 1 - 6 * 2 / (5 * 24) = 0.9
    assert spearman(np.array([1.0, 3.0, 2.0, 4.0, 5.0]), gold) == pytest.approx(90.0)


def _encoder_from(vectors: dict[str, list[float]]):
    return lambda texts: torch.tensor([vectors[t] for t in texts], dtype=torch.float32)


def test_all_pools_subsets_and_wmean_weights_per_subset_correlations(tmp_path):
    folder = tmp_path / "STS13-en-test"
    folder.mkdir()
    vectors, cosines, golds = {}, [], []
    for offset, (subset, n) in enumerate((("FNWN", 3), ("headlines", 4), ("OnWN", 5))):
        inputs, scores = [], []
        for i in range(n):
            a, b = f"{subset} a{i}", f"{subset} b{i}"
            angle = 0.3 * i
            vectors[a], vectors[b] = [1.0, 0.0], [float(np.cos(angle)), float(np.sin(angle))]
            inputs.append(f"{a}\t{b}")
            scores.append(str(5.0 * offset - i))  # perfectly ranked within a subset, shifted between subsets
            cosines.append(np.cos(angle))
            golds.append(5.0 * offset - i)
        inputs.append("skipped\tpair")
        scores.append("")  # a blank gold line marks a pair to skip (SentEval)
        (folder / f"STS.input.{subset}.txt").write_text("\n".join(inputs) + "\n")
        (folder / f"STS.gs.{subset}.txt").write_text("\n".join(scores) + "\n")
    pairs = load_semeval(folder, "STS13")
    assert len(pairs) == 12
    metrics = score_pairs(pairs, _encoder_from(vectors))
    assert metrics["spearman_wmean"] == pytest.approx(100.0)
    pooled = spearman(np.array(cosines), np.array(golds))
    assert pooled < 90.0 and metrics["spearman"] == pytest.approx(pooled)


def test_sentences_are_whitespace_normalised_and_empty_ones_become_a_period(tmp_path):
    folder = tmp_path / "STSBenchmark"
    folder.mkdir()
    (folder / "sts-test.csv").write_text("g\tf\ty\t1\t4.0\ta  b\t \ng\tf\ty\t2\t1.0\tc\td\ng\tf\ty\t3\t2.0\te\tf\n")
    pairs = STS_TASKS.get("STSB")(tmp_path)
    first, second, gold = pairs.subsets["test"]
    assert first == ["a b", "c", "e"] and second == [".", "d", "f"] and list(gold) == [4.0, 1.0, 2.0]


def test_a_perfect_text_model_scores_100_on_every_task_and_avg(tmp_path, monkeypatch):
    import protorkd.eval.sts as sts_module

    for name in ("STS12", "STS13", "STS14", "STS15", "STS16"):
        folder = tmp_path / f"{name}-en-test"
        folder.mkdir()
        for subset in sts_module.SEMEVAL_SUBSETS[name]:
            (folder / f"STS.input.{subset}.txt").write_text("".join(f"s{i} x\ts{i} y\n" for i in range(4)))
            (folder / f"STS.gs.{subset}.txt").write_text("".join(f"{i}\n" for i in range(4)))
    (tmp_path / "STSBenchmark").mkdir()
    (tmp_path / "STSBenchmark" / "sts-test.csv").write_text(
        "".join(f"g\tf\ty\t{i}\t{i}\ts{i} x\ts{i} y\n" for i in range(4))
    )
    (tmp_path / "SICK").mkdir()
    (tmp_path / "SICK" / "SICK_test_annotated.txt").write_text(
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\r\n"
        + "".join(f"{i}\ts{i} x\ts{i} y\t{i}\tNEUTRAL\r\n" for i in range(4))
    )

    def perfect(model, texts, *, device, batch_size, precision):  # cosine of "s{i} x" and "s{i} y" increases with i
        rows = []
        for text in texts:
            i = int(text.split()[0][1:])
            angle = (3 - i) * 0.4 * (1 if text.endswith("x") else -1)
            rows.append([np.cos(angle), np.sin(angle)])
        return torch.tensor(rows)

    monkeypatch.setattr(sts_module, "text_features", perfect)
    metrics = evaluate(object(), tmp_path, device="cpu")
    assert metrics["avg/spearman"] == pytest.approx(100.0)
    assert {k.split("/")[0] for k in metrics} == {"STS12", "STS13", "STS14", "STS15", "STS16", "STSB", "SICKR", "avg"}


def test_missing_sts_data_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no STS data"):
        evaluate(object(), tmp_path, device="cpu")
    (tmp_path / "STS12-en-test").mkdir()
    with pytest.raises(UsageError, match="STS.input.MSRpar.txt does not exist"):
        evaluate(object(), tmp_path, device="cpu")


def test_shared_sts_data_has_the_standard_pair_counts():
    root = shared_data("sts")
    assert present_tasks(root) == ["STS12", "STS13", "STS14", "STS15", "STS16", "STSB", "SICKR"]
    counts = {name: len(STS_TASKS.get(name)(root)) for name in present_tasks(root)}
    assert counts == {
        "STS12": 3108,
        "STS13": 1500,
        "STS14": 3750,
        "STS15": 3000,
        "STS16": 1186,
        "STSB": 1379,
        "SICKR": 4927,
    }


def test_all_minilm_l6_v2_scores_its_published_mteb_result_on_sts16():
    """MTEB's STS16 cosine Spearman for all-MiniLM-L6-v2 is 78.99 (embeddings-benchmark/results,
    sentence-transformers__all-MiniLM-L6-v2/8b3219a92973c328a8e22fadcfa821b5dc75636a/STS16.json); STS16 is the
    smallest of the seven (1,867 sentences), benchmarks/bench_eval.py --parts sts checks the others."""
    root = shared_data("sts")
    pytest.importorskip("sentence_transformers")
    from protorkd.models.build import build_dual_encoder
    from protorkd.models.options import ModelOptions

    model = build_dual_encoder(ModelOptions(text_model_builder="sbert", text_model="all-MiniLM-L6-v2")).eval()
    metrics = evaluate(model, Path(root), device="cpu", tasks=["STS16"])
    assert round(metrics["STS16/spearman"], 2) == 78.99
