"""Every registered loss trains from the CLI, in one process and under a 2-process gloo torchrun.

Also: the BYOL and SimCSE terms reach out.log, CLIP-KD distils a tiny CLIP teacher plus a tiny text
teacher from their feature caches, ProtoCLIP logs its clustering and a resumed run keeps the clusters.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from protorkd import failpoints
from protorkd.cli import main
from protorkd.losses import LOSSES
from protorkd.models.build import build_dual_encoder
from protorkd.params import read_params
from tests.conftest import TINY_TOWER_FLAGS, tiny_train_args

RECIPE = Path(__file__).resolve().parents[2] / "src" / "protorkd" / "configs" / "protoclip-cc2.5m-1gpu.args"

PROTOCLIP_HEADS = ["--add-projection-head", "--projection-dim", "16", "--projection-hidden-dim", "32"]
SMALL_LOSS_ARGS = ["--n-prototypes", "64", "--queue-size", "128", "--k", "8", "--zeroshot-frequency", "0"]
TEXT_TEACHER_ARGS = ["--extra-text-teacher", "tiny-text", "--extra-text-teacher-builder", "custom"]


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory) -> Path:
    """A `protorkd-tiny-clip` state dict saved to a file: the "pretrained" CLIP teacher of these tests."""
    import open_clip

    from protorkd.models.open_clip_models import register_open_clip_configs

    register_open_clip_configs()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teachers") / "tiny-clip.pt"
    torch.save(open_clip.create_model("protorkd-tiny-clip").state_dict(), path)
    return path


def clip_teacher_args(checkpoint: Path) -> list[str]:
    return ["--clip-teacher-model", "protorkd-tiny-clip", "--clip-teacher-tag", str(checkpoint)]


def loss_args(name: str, checkpoint: Path) -> list[str]:
    """What each loss needs beyond the tiny towers: both towers training, or teacher features."""
    if name == "CLIP-KD":
        return ["--teacher", "none", *clip_teacher_args(checkpoint)]
    if name == "ProtoCLIP":
        return ["--teacher", "none", "--PBT"]
    return []


def train_args(corpus: Path, logs: Path, name: str, *extra: str, logs_flag: str = "--logs") -> list[str]:
    return tiny_train_args(corpus, logs, name, *SMALL_LOSS_ARGS, *extra, logs_flag=logs_flag, eval_data=False)


def out_log(logs: Path, name: str) -> str:
    return (logs / name / "out.log").read_text()


def last_step_line(log_text: str) -> str:
    return [line for line in log_text.splitlines() if " step " in line][-1]


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_trains_from_the_cli(name, tiny_corpus, tmp_path, tiny_clip_checkpoint):
    assert (
        main(
            train_args(
                tiny_corpus, tmp_path, "run", "--epochs", "1", "--loss", name, *loss_args(name, tiny_clip_checkpoint)
            )
        )
        == 0
    )
    line = last_step_line(out_log(tmp_path, "run"))
    assert "step 6/6" in line and " loss " in line and "nan" not in line
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert checkpoint["optimizer"]["state"][0]["step"] == 6


def test_byol_and_simcse_terms_are_optimised_and_logged(tiny_corpus, tmp_path):
    args = ["--epochs", "1", "--loss", "SimReg", "--teacher", "none", "--byol", "--w-simcse", "0.5"]
    assert main(train_args(tiny_corpus, tmp_path, "run", *args)) == 0
    line = last_step_line(out_log(tmp_path, "run"))
    for term in ("distill_loss", "byol_loss", "simcse_loss"):
        assert f" {term} " in line


def test_a_weighted_sum_of_losses_trains_and_logs_each_term_and_the_total(tiny_corpus, tmp_path):
    args = ["--epochs", "1", "--loss", "InfoNCE+RKD+ProtoRKD", "--loss-weights", "1,0.5,0.25"]
    assert main(train_args(tiny_corpus, tmp_path, "run", *args)) == 0
    line = last_step_line(out_log(tmp_path, "run"))
    tokens = line.split(" step ", 1)[1].split()[1:]  # after "step 6/6": name value name value ...
    values = dict(zip(tokens[::2], tokens[1::2]))
    terms = ["infonce/infonce_loss", "rkd/rkd_distance_loss", "rkd/rkd_angle_loss", "protorkd/distill_loss"]
    assert all(term in values for term in terms)
    assert float(values["loss"]) == pytest.approx(sum(float(values[term]) for term in terms), rel=1e-3, abs=1e-3)
    params = read_params(tmp_path / "run" / "params.txt")
    assert params.loss.loss == "InfoNCE+RKD+ProtoRKD" and params.loss.loss_weights == "1,0.5,0.25"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss", "InfoNCE+Nope"], "Nope"),
        (["--loss", "InfoNCE+RKD", "--loss-weights", "1"], "1 weights for the 2 losses of --loss InfoNCE+RKD"),
        (["--loss-weights", "1,2"], "--loss-weights needs a sum of losses"),
    ],
)
def test_a_bad_sum_is_one_line_and_leaves_nothing(tiny_corpus, tmp_path, capsys, extra, message):
    assert main(train_args(tiny_corpus, tmp_path, "run", *extra)) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_simcse_on_a_locked_text_tower_is_refused(tiny_corpus, tmp_path, capsys):
    assert main(train_args(tiny_corpus, tmp_path, "run", "--w-simcse", "0.5", "--teacher", "text")) == 2
    assert "--w-simcse needs an online, trainable text tower" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_clip_kd_without_a_teacher_is_refused_and_leaves_nothing(tiny_corpus, tmp_path, capsys):
    assert main(train_args(tiny_corpus, tmp_path, "run", "--loss", "CLIP-KD", "--teacher", "none")) == 2
    assert "--clip-teacher-model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_clip_kd_distils_a_clip_teacher_and_a_text_teacher_from_their_caches(
    tiny_corpus, tmp_path, tiny_clip_checkpoint
):
    args = ["--epochs", "1", "--loss", "CLIP-KD", "--teacher", "none", *clip_teacher_args(tiny_clip_checkpoint)]
    args += ["--clip-teacher-images", "cached"]
    assert main(train_args(tiny_corpus, tmp_path, "run", *args, *TEXT_TEACHER_ARGS)) == 0
    log_text = out_log(tmp_path, "run")
    line = last_step_line(log_text)
    for term in ("infonce_loss", "clip_kd_logit_loss/clip", "clip_kd_fd_loss/text", "clip_kd_icl_loss/text"):
        assert f" {term} " in line
    assert "teacher clip-image features" in log_text and "teacher extra-text features" in log_text
    manifests = [p.read_text() for p in (tmp_path / "run" / "cache").glob("*/manifest.json")]
    assert len(manifests) == 3
    clip_image = next(m for m in manifests if '"modality": "image"' in m)
    assert '"image_size": 64' in clip_image  # the teacher's own 64 px transform, not the 32 px student's
    clip_text = next(m for m in manifests if "protorkd-tiny-clip" in m and '"modality": "text"' in m)
    assert '"logit_scale"' in clip_text


def test_clip_kd_runs_its_clip_teacher_online_on_the_students_batches(tiny_corpus, tmp_path, tiny_clip_checkpoint):
    args = ["--epochs", "1", "--loss", "CLIP-KD", "--teacher", "none", *clip_teacher_args(tiny_clip_checkpoint)]
    assert main(train_args(tiny_corpus, tmp_path, "run", *args)) == 0
    log_text = out_log(tmp_path, "run")
    assert "teacher clip-image runs online on the student's augmented batches" in log_text
    assert "teacher clip-image features" not in log_text  # no image cache: the captions' features only
    manifests = [p.read_text() for p in (tmp_path / "run" / "cache").glob("*/manifest.json")]
    assert len(manifests) == 1 and '"modality": "text"' in manifests[0]
    assert " clip_kd_icl_loss " in last_step_line(log_text) and " clip_kd/icl_scale " in last_step_line(log_text)


def test_protoclip_logs_clustering_and_resume_restores_the_clusters(tiny_corpus, tmp_path):
    # clustering at epoch 1 only (frequency 2): the resumed epoch 2 must train with the checkpoint's clusters
    common = ["--epochs", "2", "--loss", "ProtoCLIP", "--teacher", "none", "--clustering-frequency", "2"]
    assert main(train_args(tiny_corpus, tmp_path, "full", *common)) == 0
    log_text = out_log(tmp_path, "full")
    assert "epoch 1 clustering of 96 samples (extraction pass over this episode), k 8" in log_text
    for stat in ("image/kmeans_error", "text/empty_clusters", "image_text_ari", "image_text_ami", "seconds_kmeans"):
        assert f" {stat} " in log_text
    failpoints.arm("checkpoint-saved=1:raise")  # the run stops after epoch 1's checkpoints
    try:
        with pytest.raises(RuntimeError, match="failpoint checkpoint-saved"):
            main(train_args(tiny_corpus, tmp_path, "resumed", *common))
    finally:
        failpoints.arm("")
    log_before = out_log(tmp_path, "resumed")
    assert main(train_args(tiny_corpus, tmp_path, "resumed", *common, "--resume", "latest")) == 0
    assert "clustering of" not in out_log(tmp_path, "resumed").removeprefix(log_before)
    full = torch.load(tmp_path / "full/checkpoints/epoch_latest.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/epoch_latest.pt", weights_only=True)
    assert full["loss_state"]["text_labels"].numel() == 96
    for key, value in full["loss_state"].items():
        assert torch.equal(value, resumed["loss_state"][key]), key
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert " proto_loss 0 " not in last_step_line(out_log(tmp_path, "resumed"))


def test_protoclip_labels_every_sample_of_each_episode_by_its_position(tiny_corpus, tmp_path):
    # episodes of 64 draws with replacement from 96 rows: some rows twice, each draw labelled on its own
    args = ["--epochs", "2", "--loss", "ProtoCLIP", "--teacher", "text", "--PBT", *PROTOCLIP_HEADS]
    assert main(train_args(tiny_corpus, tmp_path, "run", *args, "--episode-size", "64")) == 0
    log_text = out_log(tmp_path, "run")
    for epoch in (1, 2):
        assert f"epoch {epoch} clustering of 64 samples (extraction pass over this episode)" in log_text
        assert f"epoch {epoch}: 100.0 % of the 64 samples trained on had a prototype label" in log_text
    state = torch.load(tmp_path / "run" / "checkpoints" / "epoch_latest.pt", weights_only=True)["loss_state"]
    assert bool(state["keyed_by_position"]) and state["text_labels"].numel() == 64
    assert int(state["text_labels"].min()) >= 0 and int(state["image_labels"].min()) >= 0
    assert " proto_loss 0 " not in last_step_line(log_text)


def test_previous_epoch_features_leave_samples_unlabelled_and_say_so(tiny_corpus, tmp_path):
    args = ["--epochs", "2", "--loss", "ProtoCLIP", "--teacher", "none", "--cluster-features", "previous-epoch"]
    assert main(train_args(tiny_corpus, tmp_path, "run", *args, "--episode-size", "96")) == 0
    log_text = out_log(tmp_path, "run")
    assert "epoch 2 clustering of 96 samples (previous epoch's training features)" in log_text
    share = float(log_text.split("epoch 2: ")[1].split(" %")[0])
    # 96 draws with replacement from 96 rows cover about 1 - 1/e = 63 % of the rows
    assert share < 90.0 and "WARNING" in log_text and "only" in log_text and "had a prototype label" in log_text


def test_the_readme_protoclip_recipe_runs_scaled_down(tiny_corpus, tmp_path):
    """configs/protoclip-cc2.5m-1gpu.args with tiny towers, 96 rows, episodes of 64, k 4 and three episodes:
    InfoNCE warm-up, a ProtoCLIP episode, and the Locked-image Tuning episode."""
    external = tmp_path / "external.npy"
    np.save(external, np.random.default_rng(0).standard_normal((96, 64)).astype(np.float32))
    scaled_down = [
        *["--train-data", str(tiny_corpus / "train.tsv"), "--eval-data-dir", str(tiny_corpus / "eval")],
        *["--external-teacher", str(external), *TINY_TOWER_FLAGS, "--workers", "0", "--report-to", ""],
        *["--dataset-size", "96", "--episode-size", "64", "--batch-size", "16", "--k", "4"],
        *["--projection-dim", "16", "--projection-hidden-dim", "32", "--lr", "1e-3", "--warmup", "2"],
        *["--epochs", "3", "--lit-start-epoch", "3", "--save-frequency", "1", "--zeroshot-frequency", "3"],
        *["--linear-frequency", "0", "--retrieval-frequency", "0", "--logs", str(tmp_path), "--name", "recipe"],
    ]
    assert main(["train", f"@{RECIPE}", *scaled_down]) == 0
    log_text = out_log(tmp_path, "recipe")
    params = (tmp_path / "recipe" / "params.txt").read_text()
    for line in ("loss: 'ProtoCLIP'", "pbt: True", "target_temperature: 0.01", "add_projection_head: True"):
        assert line in params
    epochs = {n: [line for line in log_text.splitlines() if f"epoch {n}/3 step" in line] for n in (1, 2, 3)}
    assert "epoch 1: no clustering" in log_text and " proto_loss 0 " in epochs[1][-1]  # InfoNCE warm-up
    assert "epoch 2 clustering of 64 samples" in log_text and " proto_external_loss 0 " not in epochs[2][-1]
    assert "epoch 2: 100.0 % of the 64 samples trained on had a prototype label" in log_text
    assert "epoch 3: no clustering" in log_text and " proto_loss 0 " in epochs[3][-1]  # LiT: InfoNCE only
    assert " lr 0 " in epochs[3][-1] and " lr_rest 0 " not in epochs[3][-1]
    second, third = (torch.load(tmp_path / "recipe" / f"checkpoints/epoch_{n}.pt", weights_only=True) for n in (2, 3))
    model = build_dual_encoder(read_params(tmp_path / "recipe" / "params.txt").model)
    visual = [
        f"{part}.{name}"
        for part in ("image_tower", "image_head")
        for name, _ in getattr(model, part).named_parameters()
    ]
    text = [f"text_tower.{name}" for name, _ in model.text_tower.named_parameters()]
    assert visual and all(torch.equal(second["state_dict"][k], third["state_dict"][k]) for k in visual)
    assert any(not torch.equal(second["state_dict"][k], third["state_dict"][k]) for k in text)
    assert (tmp_path / "recipe" / "results.jsonl").exists()


# Under torchrun: one loss per family (each start costs ~5 s), the auxiliaries riding along with InfoNCE.
TORCHRUN_CASES = {
    "contrastive": ("InfoNCE", ["--teacher", "none", "--byol", "--w-simcse", "0.5"], ["byol_loss", "simcse_loss"]),
    "regression": ("SimReg-SmoothL1", [], ["distill_loss"]),
    "relational": ("RKD", [], ["rkd_distance_loss", "rkd_angle_loss"]),
    "queue": ("SEED", [], ["distill_loss"]),
    "redundancy": ("BarlowTwins", [], ["barlow_off_diagonal_loss"]),
    "prototype": ("ProtoRKD", [], ["distill_loss"]),
    "clip-kd": ("CLIP-KD", ["--teacher", "none", *TEXT_TEACHER_ARGS], ["clip_kd_fd_loss/clip", "clip_kd_fd_loss/text"]),
    "protoclip": (
        "ProtoCLIP",
        ["--teacher", "none", "--PBT", *PROTOCLIP_HEADS, "--episode-size", "48"],
        ["proto_loss"],
    ),
}


@pytest.mark.parametrize("family", list(TORCHRUN_CASES))
def test_loss_family_trains_under_two_process_torchrun(family, tiny_corpus, tmp_path, tiny_clip_checkpoint):
    loss, extra, terms = TORCHRUN_CASES[family]
    if loss == "CLIP-KD":
        extra = [*extra, *clip_teacher_args(tiny_clip_checkpoint)]
    args = train_args(tiny_corpus, tmp_path, "ddp", "--epochs", "1", "--loss", loss, *extra, logs_flag="--logs-dir")
    args[args.index("--batch-size") + 1] = "8"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, "-m", "protorkd", *args, "--dataset-size", "48"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log_text = out_log(tmp_path, "ddp")
    assert "world size 2" in log_text and "model parameters identical on all 2 ranks" in log_text
    line = last_step_line(log_text)
    assert "step 3/3" in line  # 48 rows / (8 per process x 2 processes)
    for term in terms:
        assert f" {term} " in line
    if loss == "ProtoCLIP":  # both ranks' halves of the episode reached the master, and every sample had a label
        assert "epoch 1 clustering of 48 samples (extraction pass over this episode)" in log_text
        assert "epoch 1: 100.0 % of the 48 samples trained on had a prototype label" in log_text
