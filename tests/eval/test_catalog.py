"""The dataset registry: every dataset of the shipped CLIP prompt file is registered, ImageNet-A and -R map their
folders onto the published 200-class index lists, fixed class lists keep their empty classes, and a class
order that is neither the folders' order nor their names is declared."""

from __future__ import annotations

import pytest
from PIL import Image

from protorkd.eval.catalog import DATASETS, ClassificationSpec, imagenet_classes
from protorkd.eval.zeroshot import CLIP_PROMPTS_FILE, packaged_prompts, resolve_prompts

# ImageNet-A: `indices_in_1k` of hendrycks/natural-adv-examples eval.py (the keys of `thousand_k_to_200` whose
# value is not -1), transcribed from the repository @ 0777070
IMAGENET_A_INDICES = [
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105, 107,
    108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295, 298, 301,
    306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336, 347, 361, 363,
    372, 378, 386, 397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461,
    462, 470, 472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572,
    573, 575, 579, 589, 606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704,
    719, 736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804, 813, 815,
    820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880, 888, 890, 897, 900, 907, 913, 924, 932,
    933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988,
]  # fmt: skip
# ImageNet-R: `imagenet_r_indices`, the list hendrycks/imagenet-r eval.py (@ 3131cac) gives for its mask
IMAGENET_R_INDICES = [
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100, 105, 107,
    113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172, 178, 187, 195, 199,
    203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260, 263, 265, 267, 269, 276, 277,
    281, 288, 289, 291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327, 330, 334, 335, 337,
    338, 340, 341, 344, 347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397, 401, 407, 413, 414,
    425, 428, 430, 435, 437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558,
    570, 579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768, 774, 776,
    779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883, 889, 895, 907, 928, 931, 932, 933, 934,
    936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965, 967, 980, 981, 983, 988,
]  # fmt: skip


def _image(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (120, 30, 200)).save(path)


def test_every_dataset_of_the_shipped_prompt_file_is_registered():
    prompts = set(packaged_prompts(CLIP_PROMPTS_FILE))
    registered = {spec.prompts for spec in map(DATASETS.get, DATASETS) if isinstance(spec, ClassificationSpec)}
    assert prompts <= registered and len(prompts) == 27


@pytest.mark.parametrize(
    ("name", "published"), [("imagenet_a", IMAGENET_A_INDICES), ("imagenet_r", IMAGENET_R_INDICES)]
)
def test_imagenet_a_and_r_folders_map_onto_the_published_200_class_index_lists(tmp_path, name, published):
    assert len(published) == 200
    wnids = imagenet_classes()["wnids"]
    spec = DATASETS.get(name)
    # the archive's layout: one folder per WordNet id, written here in a shuffled order
    for index in reversed(published):
        _image(tmp_path / spec.folder / wnids[index] / "a.jpg")
    dataset = spec.load(tmp_path, spec.test_split, transform=lambda image: image)
    assert [wnids.index(folder) for folder in dataset.classes] == published  # label i is 1k class published[i]
    imagenet = packaged_prompts(CLIP_PROMPTS_FILE)["ImageNet"]["classes"]
    prompts = resolve_prompts(
        name, dataset.class_folders, dataset.classes, packaged_key=spec.prompts, subset=spec.prompt_classes
    )
    assert prompts.classnames == [imagenet[i] for i in published]  # scored among its own 200 classes


def test_a_folder_outside_a_registered_class_list_is_refused(tmp_path):
    spec = DATASETS.get("imagenet_r")
    _image(tmp_path / spec.folder / "n99999999" / "a.jpg")
    with pytest.raises(Exception, match="outside this dataset's 200 classes, e.g. n99999999"):
        spec.load(tmp_path, spec.test_split, transform=lambda image: image)


def test_birdsnap_stays_500_way_when_the_cloob_copy_has_empty_class_folders(tmp_path):
    spec = DATASETS.get("birdsnap")
    for index in range(500):
        folder = tmp_path / "birdsnap" / "test" / f"{index:03d}"
        folder.mkdir(parents=True)
        if index not in (46, 66, 123):  # empty, as 9 folders of CLOOB's copy are
            _image(folder / "a.jpg")
    dataset = spec.load(tmp_path, "test", transform=lambda image: image)
    assert len(dataset.classes) == 500 and dataset.empty_classes == ["046", "066", "123"]
    assert dataset.samples[46][1] == 47  # the first image after the empty folder keeps the label of 047
    prompts = resolve_prompts("birdsnap", dataset.class_folders, dataset.classes, packaged_key="Birdsnap")
    assert prompts.classnames == packaged_prompts(CLIP_PROMPTS_FILE)["Birdsnap"]["classes"]


def test_eurosat_folders_get_the_names_of_their_classes_not_of_their_position(tmp_path):
    spec = DATASETS.get("eurosat")
    for folder in ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"):  # fmt: skip
        _image(tmp_path / "eurosat" / "test" / folder / "a.jpg")
    dataset = spec.load(tmp_path, "test", transform=lambda image: image)
    prompts = resolve_prompts("eurosat", dataset.class_folders, dataset.classes, packaged_key="EuroSAT")
    named = dict(zip(dataset.classes, prompts.classnames))
    assert named["AnnualCrop"] == "annual crop land" and named["SeaLake"] == "lake or sea"
    assert named["HerbaceousVegetation"] == "brushland or shrubland" and named["Highway"] == "highway or road"


def test_a_dataset_nobody_registered_is_named_by_its_folders_and_its_records_by_it(tmp_path):
    from protorkd.eval.catalog import select

    _image(tmp_path / "mnist_digits" / "test" / "seven" / "a.png")
    [spec] = select(tmp_path, None)
    assert spec.name == "mnist_digits" and not spec.registered and spec.zeroshot_record_name == "mnist_digits"
    registered = DATASETS.get("mnist")
    assert registered.registered and registered.zeroshot_record_name == "mnist"
    assert DATASETS.get("cifar100").zeroshot_record_name == "cifar100_openai_classnames"
