"""Checkpoints are plain dicts written atomically."""

from __future__ import annotations

import pytest
import torch

from protorkd.checkpoint import load_checkpoint, save_checkpoint
from protorkd.errors import UsageError


def test_checkpoint_is_atomic_and_plain(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 1, "state_dict": {"w": torch.ones(2)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temporary file left behind
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(2)) and "version" in loaded
    assert load_checkpoint(path)["epoch"] == 1
    with pytest.raises(UsageError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


class _RunsAShellCommand:
    """Unpickling this object would run `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_object_checkpoint_is_refused_in_one_line_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "state_dict": {}, "payload": _RunsAShellCommand(marker)}, path)
    with pytest.raises(UsageError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message == (
        f"cannot load checkpoint {path}: it holds a pickled object (posix.system); protorkd loads only plain "
        "dicts of tensors, numbers and strings and never unpickles objects"
    )
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0, 10, 200, -30])
def test_a_truncated_checkpoint_is_refused_in_one_line(tmp_path, keep):
    whole = tmp_path / "whole.pt"
    save_checkpoint(whole, {"epoch": 1, "state_dict": {"w": torch.ones(1000)}})
    data = whole.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(UsageError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"cannot load checkpoint {path}: it is truncated or not a torch checkpoint")
    assert "never unpickles objects" in message and "\n" not in message and "weights_only" not in message


def test_a_kill_between_the_two_checkpoint_files_is_repaired_from_the_latest(tmp_path):
    from protorkd.checkpoint import restore_numbered_checkpoint

    latest = {"epoch": 2, "state_dict": {"w": torch.arange(3.0)}, "optimizer": {"state": {}}, "loss_state": {}}
    save_checkpoint(tmp_path / "epoch_latest.pt", latest)
    assert restore_numbered_checkpoint(tmp_path, 2) == tmp_path / "epoch_2.pt"
    restored = load_checkpoint(tmp_path / "epoch_2.pt")  # the weights; the training state stays in the latest
    assert set(restored) == {"epoch", "state_dict", "version"} and restored["epoch"] == 2
    assert torch.equal(restored["state_dict"]["w"], torch.arange(3.0))
    assert restore_numbered_checkpoint(tmp_path, 2) is None  # already there: left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_2.pt", "epoch_latest.pt"]


def test_a_checkpoint_whose_tensors_changed_is_refused_in_one_line(tmp_path):
    """Issue 25: one flipped bit in a weight resumed without a word and the model fell to chance."""
    from protorkd.checkpoint import CHECKSUM, load_checkpoint, save_checkpoint, tensors_sha256
    from protorkd.errors import UsageError

    weights = {"head.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "scale": torch.tensor(2.5)}
    path = tmp_path / "epoch_latest.pt"
    save_checkpoint(path, {"epoch": 1, "state_dict": weights, "optimizer": {"state": {0: {"step": torch.tensor(3)}}}})
    loaded = load_checkpoint(path)  # intact: loads, the checksum taken off
    assert CHECKSUM not in loaded and torch.equal(loaded["state_dict"]["head.weight"], weights["head.weight"])
    raw = torch.load(path, weights_only=True)
    bits = raw["state_dict"]["head.weight"].view(torch.int32)
    bits[1, 2] ^= 1  # one bit of one weight: 5.0 becomes 5.000000476837158
    torch.save(raw, path)  # written without a new checksum, as a corruption on disk would be
    assert raw["state_dict"]["head.weight"][1, 2].item() == pytest.approx(5.0, abs=1e-6)
    with pytest.raises(UsageError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(f"checkpoint {path} is corrupt: its tensors do not match the sha256")
    # the hash covers every tensor's place, dtype, shape and bytes: a hand-built sha256 of this payload
    import hashlib

    payload = {"a": torch.tensor([1, 2], dtype=torch.int16), "b": [torch.tensor(1.0)]}
    digest = hashlib.sha256()
    digest.update(b"/a|torch.int16|(2,)|" + bytes([1, 0, 2, 0]))
    digest.update(b"/b[0]|torch.float32|()|" + torch.tensor(1.0).numpy().tobytes())
    assert tensors_sha256(payload) == digest.hexdigest()


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    from protorkd.checkpoint import load_checkpoint

    path = tmp_path / "old.pt"
    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(2)}}, path)
    assert load_checkpoint(path)["epoch"] == 1
