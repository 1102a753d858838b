"""Loading a trained model: `protorkd.load`, and checkpoints that hold what was trained (locked towers named by
source and sha256, rebuilt and checked), old full checkpoints included."""

from __future__ import annotations

import hashlib
import shlex
import shutil

import pytest
import torch
import torch.nn.functional as F

import protorkd
from protorkd.checkpoint import prune_checkpoints, save_checkpoint
from protorkd.cli import main
from protorkd.loading import checkpoint_path, load_model_from_checkpoint
from protorkd.models.text_towers import build_text_tower
from protorkd.params import read_params, train_command

TEXTS = ["a red circle", "two green squares on a black background"]


def test_load_gives_open_clips_interface_for_a_checkpoint_and_its_run_folder(demo_student_run):
    assert checkpoint_path(demo_student_run) == demo_student_run / "checkpoints" / "epoch_latest.pt"
    model, preprocess, tokenizer = protorkd.load(demo_student_run)
    evaluated = model.model  # the DualEncoder evaluation reads, loaded from the same checkpoint
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = model.encode_image(images)  # open_clip's default: not normalised
        assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))
        assert torch.equal(model.encode_image(images, normalize=True), F.normalize(raw, dim=-1))
        assert torch.equal(model.encode_image(images, normalize=True), evaluated.encode_image(images))
        text = model.encode_text(tokenizer(TEXTS), normalize=True)
        assert torch.equal(text, evaluated.encode_texts(TEXTS))
    assert preprocess.__class__.__name__ == "Compose" and text.shape == (2, 384)
    assert model.logit_scale.item() == pytest.approx(  # the loss's learned temperature
        torch.load(demo_student_run / "checkpoints" / "epoch_latest.pt", weights_only=True)["logit_scale"].item()
    )


def test_a_checkpoint_names_its_locked_teacher_tower_by_source_and_sha256(demo_student_run):
    checkpoint = torch.load(demo_student_run / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert not [key for key in checkpoint["state_dict"] if key.startswith("text_tower.")]
    record = checkpoint["locked_towers"]["text_tower"]
    assert {k: record[k] for k in ("builder", "model", "tag", "pooler", "max_seq_length", "dtype")} == {
        "builder": "sbert", "model": "all-MiniLM-L6-v2", "tag": "", "pooler": "mean", "max_seq_length": 0,
        "dtype": "float32",
    }  # fmt: skip
    # the documented hash, computed here by hand: name, dtype, shape and bytes of every tensor, in module order
    digest = hashlib.sha256()
    for name, tensor in build_text_tower("sbert", "all-MiniLM-L6-v2", pooler="mean").state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    assert record["sha256"] == digest.hexdigest()
    latest = torch.load(demo_student_run / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert "optimizer" not in checkpoint and "optimizer" in latest and "loss_state" in latest


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"sha256": "0" * 64},
            "the locked text_tower rebuilt from its source sbert:all-MiniLM-L6-v2 has other weights",
        ),
        ({"pooler": "cls"}, "the locked text_tower was pooler 'cls' vs 'mean'"),
    ],
)
def test_a_locked_tower_that_is_not_the_one_trained_with_is_refused_in_one_line(
    demo_student_run, tmp_path, capsys, change, message
):
    checkpoint = torch.load(demo_student_run / "checkpoints" / "epoch_1.pt", weights_only=True)
    checkpoint["locked_towers"]["text_tower"].update(change)
    save_checkpoint(tmp_path / "epoch_1.pt", checkpoint)
    assert main(["eval", "--checkpoint", str(tmp_path / "epoch_1.pt"), "--eval-data-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error and str(tmp_path / "epoch_1.pt") in error


def test_a_full_checkpoint_written_before_lean_checkpoints_still_loads_to_the_same_model(demo_student_run, tmp_path):
    lean = load_model_from_checkpoint(demo_student_run / "checkpoints" / "epoch_1.pt")
    latest = torch.load(demo_student_run / "checkpoints" / "epoch_latest.pt", weights_only=True)
    old = {key: latest[key] for key in ("epoch", "name", "config", "loss_state", "optimizer")}
    old["state_dict"] = lean.model.state_dict()  # every tower, the locked MiniLM too, and no locked_towers
    save_checkpoint(tmp_path / "epoch_1.pt", old)
    loaded = load_model_from_checkpoint(tmp_path / "epoch_1.pt")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), lean.model.encode_image(images))
        assert torch.equal(loaded.model.encode_texts(TEXTS), lean.model.encode_texts(TEXTS))
    assert loaded.logit_scale == pytest.approx(latest["loss_state"]["logit_scale"].item())


def test_a_weights_only_checkpoint_cannot_resume_and_says_where_to_resume_from(demo_student_run, tmp_path, capsys):
    run = shutil.copytree(demo_student_run, tmp_path / "demo")
    args = shlex.split(train_command(read_params(run / "params.txt")))[1:]  # the run's own command
    assert main([*args, "--logs", str(tmp_path), "--resume", str(run / "checkpoints" / "epoch_1.pt")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "holds weights only" in error and "epoch_latest.pt" in error


def test_keep_checkpoints_deletes_all_but_the_most_recent_numbered_ones(tmp_path):
    for name in ("epoch_1.pt", "epoch_2.pt", "epoch_10.pt", "epoch_3.pt", "epoch_latest.pt", "epoch_x.pt"):
        (tmp_path / name).write_bytes(b"")
    assert prune_checkpoints(tmp_path, 0) == []  # 0 keeps all
    assert sorted(p.name for p in prune_checkpoints(tmp_path, 2)) == ["epoch_1.pt", "epoch_2.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_10.pt", "epoch_3.pt", "epoch_latest.pt", "epoch_x.pt"]
