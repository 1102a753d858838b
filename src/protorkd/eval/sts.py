"""Semantic textual similarity with SimCSE's protocol (SentEval files, cosine, Spearman x 100).

STS12-16: the Spearman correlation of all subsets pooled ("all", the number SimCSE reports), plus the
subset-size weighted mean of per-subset correlations ("wmean"). STS-B and SICK-R: the test split.
"avg" is the mean of the seven. Sentences are SentEval's whitespace tokens joined by single spaces
("." for an empty one), as SimCSE's batcher does. Data layout (`ROOT/sts/`): docs/data.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protorkd.errors import UsageError
from protorkd.eval.features import text_features
from protorkd.precision import Precision
from protorkd.registry import Registry

# SentEval's subsets of each SemEval year (STS13's SMT is not distributed, STS12's ALL is not a subset).
SEMEVAL_SUBSETS = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}


@dataclass
class STSPairs:
    """Sentence pairs with gold scores, grouped in subsets (one subset for STS-B / SICK-R test)."""

    name: str
    subsets: dict[str, tuple[list[str], list[str], np.ndarray]]

    def __len__(self) -> int:
        return sum(len(gold) for _, _, gold in self.subsets.values())


def _sentence(text: str) -> str:
    return " ".join(text.split()) or "."


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UsageError(f"STS file {path} does not exist (see docs/data.md for the SentEval layout)")
    return path.read_text(encoding="utf-8").splitlines()


def load_semeval(folder: Path, name: str) -> STSPairs:
    """`STS.input.<subset>.txt` (two tab-separated sentences) + `STS.gs.<subset>.txt` (blank = skip the pair)."""
    subsets = {}
    for subset in SEMEVAL_SUBSETS[name]:
        inputs = _read_lines(folder / f"STS.input.{subset}.txt")
        scores = _read_lines(folder / f"STS.gs.{subset}.txt")
        if len(inputs) != len(scores):
            raise UsageError(
                f"{folder}: STS.input.{subset}.txt has {len(inputs)} lines but STS.gs.{subset}.txt has {len(scores)}"
            )
        first, second, gold = [], [], []
        for line_number, (line, score) in enumerate(zip(inputs, scores), start=1):
            if not score.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise UsageError(
                    f"{folder / f'STS.input.{subset}.txt'}:{line_number}: expected two tab-separated sentences"
                )
            first.append(_sentence(fields[0]))
            second.append(_sentence(fields[1]))
            gold.append(float(score))
        subsets[subset] = (first, second, np.asarray(gold))
    return STSPairs(name, subsets)


def load_table(path: Path, name: str, *, first: int, second: int, score: int, header: bool) -> STSPairs:
    """A tab-separated file with two sentence columns and a score column (STS-B csv, SICK txt)."""
    lines = _read_lines(path)[1 if header else 0 :]
    left, right, gold = [], [], []
    for line_number, line in enumerate(lines, start=2 if header else 1):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split("\t")
        try:
            left.append(_sentence(fields[first]))
            right.append(_sentence(fields[second]))
            gold.append(float(fields[score]))
        except (IndexError, ValueError) as error:
            raise UsageError(f"{path}:{line_number}: cannot read a sentence pair and score ({error})") from error
    return STSPairs(name, {"test": (left, right, np.asarray(gold))})


STS_TASKS: Registry = Registry("STS task")
for _name in SEMEVAL_SUBSETS:
    STS_TASKS.register(_name)(lambda root, _name=_name: load_semeval(Path(root) / f"{_name}-en-test", _name))
STS_TASKS.register("STSB")(
    lambda root: load_table(
        Path(root) / "STSBenchmark" / "sts-test.csv", "STSB", first=5, second=6, score=4, header=False
    )
)
STS_TASKS.register("SICKR")(
    lambda root: load_table(
        Path(root) / "SICK" / "SICK_test_annotated.txt", "SICKR", first=1, second=2, score=3, header=True
    )
)
TASK_ORDER = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSB", "SICKR")
TASK_FOLDERS = {
    "STS12": "STS12-en-test",
    "STS13": "STS13-en-test",
    "STS14": "STS14-en-test",
    "STS15": "STS15-en-test",
    "STS16": "STS16-en-test",
    "STSB": "STSBenchmark",
    "SICKR": "SICK",
}


def present_tasks(root: Path) -> list[str]:
    """The STS tasks whose folder exists under `root` (the `ROOT/sts` folder)."""
    return [name for name in TASK_ORDER if (Path(root) / TASK_FOLDERS[name]).is_dir()]


def spearman(system: np.ndarray, gold: np.ndarray) -> float:
    """Spearman's rank correlation x 100 (scipy's, ties get average ranks as in SentEval)."""
    from scipy.stats import spearmanr  # imported when used: scipy.stats takes ~1 s to import

    return 100.0 * float(spearmanr(system, gold).statistic)


def cosine_scores(first: torch.Tensor, second: torch.Tensor) -> np.ndarray:
    """Row-wise cosine similarity of [N, D] x [N, D] -> [N]."""
    first, second = first.double(), second.double()
    return (torch.nn.functional.cosine_similarity(first, second, dim=1)).numpy()


def score_pairs(pairs: STSPairs, encode: Callable[[list[str]], torch.Tensor]) -> dict[str, float]:
    """{"spearman", ["spearman_wmean"]} for one task; `encode(list[str]) -> [N, D]`."""
    system_all, gold_all, per_subset, sizes = [], [], [], []
    sentences = sorted({s for first, second, _ in pairs.subsets.values() for s in (*first, *second)})
    features = encode(sentences)
    row = {s: i for i, s in enumerate(sentences)}
    for first, second, gold in pairs.subsets.values():
        system = cosine_scores(features[[row[s] for s in first]], features[[row[s] for s in second]])
        system_all.append(system)
        gold_all.append(gold)
        per_subset.append(spearman(system, gold))
        sizes.append(len(gold))
    metrics = {"spearman": spearman(np.concatenate(system_all), np.concatenate(gold_all))}
    if len(pairs.subsets) > 1:
        metrics["spearman_wmean"] = float(np.average(per_subset, weights=sizes))
    return metrics


def evaluate(
    model: torch.nn.Module,
    root: Path,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    tasks: list[str] | None = None,
    precision: Precision = Precision.FP32,
) -> dict[str, float]:
    """STS metrics of the model's text side on the SentEval folders under `root` (`ROOT/sts`).

    Keys: `<task>/spearman` (STS12-16: "all"), `<task>/spearman_wmean` (STS12-16), and `avg/spearman`
    when all seven tasks ran.
    """
    names = tasks or present_tasks(root)
    if not names:
        raise UsageError(f"no STS data under {root} (expected {', '.join(TASK_FOLDERS.values())})")

    def encode(texts: list[str]) -> torch.Tensor:
        return text_features(model, texts, device=device, batch_size=batch_size, precision=precision)

    metrics: dict[str, float] = {}
    for name in names:
        for key, value in score_pairs(STS_TASKS.get(name)(root), encode).items():
            metrics[f"{name}/{key}"] = value
    if all(f"{name}/spearman" in metrics for name in TASK_ORDER):
        metrics["avg/spearman"] = float(np.mean([metrics[f"{name}/spearman"] for name in TASK_ORDER]))
    return metrics
