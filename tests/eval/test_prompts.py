"""The prompt files shipped as package data: rebuilt from their source by the committed script, and complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from protorkd.eval.elevater_format import ELEVATER_DATASETS
from protorkd.eval.zeroshot import packaged_prompts
from tests.conftest import shared_data

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_clip_prompts_are_what_the_build_script_makes_of_the_shared_prompt_file():
    source = shared_data("clip_prompts") / "clip_zeroshot_prompts.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_prompts.py"), "--clip", str(source), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "up to date" in result.stdout, result.stdout + result.stderr


def test_the_clip_prompts_hold_clips_27_datasets_with_their_published_counts():
    prompts = packaged_prompts("clip_zeroshot_prompts.json")
    assert len(prompts) == 27
    # (classes, templates) as OpenAI's prompts.md and ImageNet notebook list them
    assert {name: (len(e["classes"]), len(e["templates"])) for name, e in prompts.items() if name in {
        "CIFAR10", "CIFAR100", "ImageNet", "StanfordCars", "UCF101", "FacialEmotionRecognition2013"
    }} == {
        "CIFAR10": (10, 18),
        "CIFAR100": (100, 18),
        "ImageNet": (1000, 80),
        "StanfordCars": (196, 8),
        "UCF101": (101, 48),
        "FacialEmotionRecognition2013": (7, 6),
    }  # fmt: skip


def test_the_toolkit_prompts_cover_the_20_elevater_datasets_in_their_label_counts():
    prompts = packaged_prompts("elevater_prompts.json")
    counts = {name: len(prompts[ELEVATER_DATASETS.get(name).hub_name]["classes"]) for name in ELEVATER_DATASETS.names()}
    # the class counts of the toolkit's dataset definitions (docs/elevater.md)
    assert counts == {
        "caltech101": 102,
        "cifar10": 10,
        "cifar100": 100,
        "country211": 211,
        "dtd": 47,
        "eurosat": 10,
        "fer2013": 7,
        "fgvc-aircraft": 100,
        "food101": 101,
        "gtsrb": 43,
        "hateful-memes": 2,
        "kitti-distance": 4,
        "mnist": 10,
        "oxford-flowers": 102,
        "oxford-pets": 37,
        "patchcamelyon": 2,
        "rendered-sst2": 2,
        "resisc45": 45,
        "stanford-cars": 196,
        "voc2007": 20,
    }
    # the toolkit's own quirk, kept: CIFAR-10 is prompted with its CIFAR-100 templates (18 of them)
    assert (
        prompts["cifar-10"]["templates"] == prompts["cifar-100"]["templates"]
        and len(prompts["cifar-10"]["templates"]) == 18
    )


def test_elevater_zero_shot_uses_the_first_of_a_classes_synonyms_as_the_toolkit_does():
    from protorkd.eval.elevater import toolkit_prompts

    classnames, templates = toolkit_prompts("fer-2013", 7)
    assert classnames == ["angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised"]
    assert templates[0] == "a photo of a {} looking face." and len(templates) == 6
