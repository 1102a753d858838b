"""Rebuild the model of a checkpoint from the config stored in it (or its experiment's params.txt).

A checkpoint whose weights do not fit the model its config describes, or whose stored config disagrees
with params.txt, is refused with a message naming the files: evaluating a differently built model would
give a silently wrong number.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from protorkd.config import Config, ModelConfig, read_params
from protorkd.errors import UsageError
from protorkd.models.build import build_dual_encoder
from protorkd.models.dual_encoder import DualEncoder
from protorkd.train.checkpoint import load_checkpoint, strip_module_prefix

log = logging.getLogger(__name__)


@dataclass
class LoadedCheckpoint:
    model: DualEncoder
    model_config: ModelConfig
    epoch: int | None
    name: str
    experiment_dir: Path | None  # set when the checkpoint sits in `<experiment>/checkpoints/`
    config_source: str
    train_config: dict  # every flag of the training run (stored config, else params.txt)


def experiment_of(checkpoint_path: Path) -> Path | None:
    """`<experiment>` for `<experiment>/checkpoints/epoch_N.pt` when that folder holds a params.txt."""
    folder = Path(checkpoint_path).resolve().parent
    if folder.name == "checkpoints" and (folder.parent / "params.txt").is_file():
        return folder.parent
    return None


def _differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [
        f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def _mismatch_summary(model: DualEncoder, state_dict: dict) -> list[str]:
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            problems.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    return problems


def load_model_from_checkpoint(path: Path) -> LoadedCheckpoint:
    """The checkpoint's model with its weights, in eval mode on the CPU."""
    path = Path(path)
    checkpoint = load_checkpoint(path)
    if "state_dict" not in checkpoint:
        raise UsageError(f"{path} is not a protorkd checkpoint (no state_dict)")
    experiment = experiment_of(path)
    params_path = experiment / "params.txt" if experiment else None
    stored = None
    if isinstance(checkpoint.get("config"), dict):
        try:
            stored = Config.from_flat_dict(checkpoint["config"], strict=False).model
        except (TypeError, ValueError) as error:
            raise UsageError(f"{path}: cannot read its stored config ({error})") from error
    from_params, params_values = None, {}
    if params_path is not None:
        try:
            params_config = read_params(params_path)
            from_params, params_values = params_config.model, params_config.to_flat_dict()
        except (ValueError, SyntaxError) as error:
            raise UsageError(f"cannot read {params_path}: {error}") from error
    if stored is None and from_params is None:
        raise UsageError(
            f"{path} stores no config and has no experiment params.txt beside it "
            "(expected <experiment>/checkpoints/<file>.pt); pass the tower flags instead"
        )
    if stored is not None and from_params is not None and _differences(stored, from_params):
        raise UsageError(
            f"checkpoint {path} does not match {params_path}: " + "; ".join(_differences(stored, from_params))
        )
    model_config = stored or from_params
    source = f"{path} (stored config)" if stored is not None else str(params_path)
    model = build_dual_encoder(model_config)
    state_dict = strip_module_prefix(checkpoint["state_dict"])
    problems = _mismatch_summary(model, state_dict)
    if problems:
        raise UsageError(f"checkpoint {path} does not fit the model described by {source}: {'; '.join(problems)}")
    model.load_state_dict(state_dict)
    model.eval()
    epoch = checkpoint.get("epoch")
    return LoadedCheckpoint(
        model,
        model_config,
        int(epoch) if epoch is not None else None,
        str(checkpoint.get("name") or (experiment.name if experiment else path.stem)),
        experiment,
        source,
        dict(checkpoint.get("config") or params_values),
    )
