"""Load a trained model from a checkpoint, a run folder or an export folder: `protorkd.load(PATH)`.

A checkpoint stores the flags of its training run as one flat dict (`checkpoint["config"]`);
`model_options_from_flat` picks the model flags out of it. When the checkpoint sits in an experiment folder
(`<experiment>/checkpoints/epoch_N.pt`), the experiment's params.txt must agree with it (a checkpoint beside
the wrong params.txt is refused, naming both), and stands in for it when the checkpoint stores no config.
Weights that do not fit the model the options describe are refused with a message naming the checkpoint
and where the options came from: evaluating a differently built model would give a silently wrong number.
A locked tower the checkpoint names by source is rebuilt and its sha256 checked (`checkpoint.load_model_state`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protorkd.checkpoint import LATEST, load_checkpoint, load_model_state, numbered_checkpoints
from protorkd.errors import UsageError
from protorkd.models.build import build_dual_encoder
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.open_clip_models import trained_weights_follow
from protorkd.models.options import ModelOptions
from protorkd.options import read_flag_values

OPEN_CLIP_CONFIG = "open_clip_config.json"  # what makes a folder an open_clip export
ONNX_MANIFEST = "protorkd_onnx.json"  # what makes a folder an ONNX export


def model_options_from_flat(values: Mapping[str, Any]) -> ModelOptions:
    """The model flags among a run's flat {flag name: value} dict (other flags are ignored)."""
    names = {f.name for f in dataclasses.fields(ModelOptions)}
    return ModelOptions(**{key: value for key, value in values.items() if key in names})


def option_differences(a: ModelOptions, b: ModelOptions) -> list[str]:
    """`name: a vs b` for every model flag on which `a` and `b` differ."""
    return [
        f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
        for f in dataclasses.fields(ModelOptions)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def require_weights(checkpoint: Mapping[str, Any], path: Path) -> None:
    """Refuse a file that holds no model weights (not a protorkd checkpoint)."""
    if "state_dict" not in checkpoint:
        raise UsageError(f"{path} is not a protorkd checkpoint (no state_dict)")


def model_from_checkpoint(
    checkpoint: Mapping[str, Any], options: ModelOptions, *, path: Path, source: str
) -> DualEncoder:
    """The model `options` describe with the checkpoint's weights, in eval mode on the CPU.

    `path` (the checkpoint) and `source` (where `options` came from) only name things in the error raised
    when the weights do not fit.
    """
    require_weights(checkpoint, path)
    with trained_weights_follow():  # open_clip's "initialized randomly" would be false: the weights follow
        model = build_dual_encoder(options)
    load_model_state(
        model, dict(checkpoint), options, where=f"checkpoint {path} does not fit the model described by {source}"
    )
    model.eval()
    return model


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model and what describes it (for evaluation records, exports and model cards)."""

    model: DualEncoder
    model_options: ModelOptions
    epoch: int | None
    name: str
    path: Path
    experiment_dir: Path | None  # set when the checkpoint sits in `<experiment>/checkpoints/`
    config_source: str
    train_config: dict[str, Any]  # every flag of the training run as the checkpoint stores it ({} if it does not)
    logit_scale: float | None  # the loss's learned log temperature, when the checkpoint records one


def experiment_of(checkpoint_path: Path) -> Path | None:
    """`<experiment>` for `<experiment>/checkpoints/epoch_N.pt` when that folder holds a params.txt."""
    folder = Path(checkpoint_path).resolve().parent
    if folder.name == "checkpoints" and (folder.parent / "params.txt").is_file():
        return folder.parent
    return None


def _params_model_options(path: Path) -> ModelOptions:
    """The model flags of an experiment's params.txt."""
    try:
        return ModelOptions(**read_flag_values(path, typing.get_type_hints(ModelOptions)))
    except (ValueError, SyntaxError) as error:
        raise UsageError(f"cannot read {path}: {error}") from error


def _logit_scale(checkpoint: Mapping[str, Any]) -> float | None:
    """The learned log temperature: recorded by name (new checkpoints), or in an older checkpoint's loss state."""
    value = checkpoint.get("logit_scale")
    if value is None:
        value = (checkpoint.get("loss_state") or {}).get("logit_scale")
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else None


def load_model_from_checkpoint(path: Path) -> LoadedCheckpoint:
    """The checkpoint's model with its weights, in eval mode on the CPU.

    The model flags come from the config stored in the checkpoint, else from its experiment's params.txt;
    when both exist they must agree (a checkpoint beside the wrong params.txt is refused, naming both).
    """
    path = Path(path)
    checkpoint = load_checkpoint(path)
    require_weights(checkpoint, path)
    experiment = experiment_of(path)
    params_path = experiment / "params.txt" if experiment else None
    stored = None
    if isinstance(checkpoint.get("config"), dict):
        try:
            stored = model_options_from_flat(checkpoint["config"])
        except (TypeError, ValueError) as error:
            raise UsageError(f"{path}: cannot read its stored config ({error})") from error
    from_params = _params_model_options(params_path) if params_path is not None else None
    if stored is None and from_params is None:
        raise UsageError(
            f"{path} stores no config and has no experiment params.txt beside it "
            "(expected <experiment>/checkpoints/<file>.pt); pass the tower flags instead"
        )
    if stored is not None and from_params is not None and option_differences(stored, from_params):
        raise UsageError(
            f"checkpoint {path} does not match {params_path}: " + "; ".join(option_differences(stored, from_params))
        )
    options = stored or from_params
    source = f"{path} (stored config)" if stored is not None else str(params_path)
    model = model_from_checkpoint(checkpoint, options, path=path, source=source)
    epoch = checkpoint.get("epoch")
    return LoadedCheckpoint(
        model,
        options,
        int(epoch) if epoch is not None else None,
        str(checkpoint.get("name") or (experiment.name if experiment else path.stem)),
        path,
        experiment,
        source,
        dict(checkpoint.get("config") or {}),
        _logit_scale(checkpoint),
    )


# ----------------------------------------------------------------------------------------------- any model path


def run_checkpoint(run_dir: Path) -> Path:
    """A run folder's latest checkpoint: checkpoints/epoch_latest.pt, else its highest epoch_N.pt."""
    folder = Path(run_dir) / "checkpoints"
    if (folder / LATEST).is_file():
        return folder / LATEST
    numbered = numbered_checkpoints(folder)
    if not numbered:
        raise UsageError(f"{run_dir} is a run folder without checkpoints (no {folder / LATEST} or epoch_N.pt)")
    return numbered[-1][1]


def model_kind(path: Path) -> str:
    """ "checkpoint", "open_clip" (an export folder open_clip loads) or "onnx" (an ONNX export folder); a run
    folder counts as its latest checkpoint. Anything else is a one-line UsageError."""
    path = Path(path)
    if path.is_file():
        return "checkpoint"
    if (path / OPEN_CLIP_CONFIG).is_file():
        return "open_clip"
    if (path / ONNX_MANIFEST).is_file():
        return "onnx"
    if (path / "checkpoints").is_dir():
        return "checkpoint"
    raise UsageError(
        f"{path}: not a model (expected a checkpoint .pt, a run folder with checkpoints/, or an export folder "
        f"with {OPEN_CLIP_CONFIG})"
    )


def checkpoint_path(path: Path) -> Path:
    """The checkpoint a checkpoint path or a run folder names."""
    path = Path(path)
    return path if path.is_file() else run_checkpoint(path)


Preprocess = Callable[[Any], torch.Tensor]


def load(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Preprocess, Any]:
    """`model, preprocess, tokenizer = protorkd.load(PATH)`: a checkpoint, a run folder (its latest checkpoint)
    or an export folder, in eval mode on `device`.

    `model.encode_image(images, normalize=False)` and `model.encode_text(tokens, normalize=False)` behave as
    open_clip's (joint-space features [B, D]; `normalize=True` L2-normalises them); `preprocess(pil_image)` is
    the evaluation transform ([3, H, W]); `tokenizer(list_of_texts)` gives the tokens `encode_text` takes.
    An export folder loads through open_clip itself (`open_clip.create_model_and_transforms("local-dir:...")`).
    """
    path = Path(path)
    kind = model_kind(path)
    if kind == "onnx":
        raise UsageError(f"{path} is an ONNX export: run it with onnxruntime (docs/export.md); protorkd.load reads "
                         "checkpoints, run folders and open_clip exports")  # fmt: skip
    if kind == "open_clip":
        import open_clip

        from protorkd.models.open_clip_models import LOCAL_DIR, quiet_root_logger

        name = f"{LOCAL_DIR}{path.resolve()}"
        with quiet_root_logger():
            model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
            tokenizer = open_clip.get_tokenizer(name)
        return model.eval(), preprocess, tokenizer
    from protorkd.data.transforms import eval_transform
    from protorkd.models.encoder import Encoder

    loaded = load_model_from_checkpoint(checkpoint_path(path))
    encoder = Encoder(loaded.model, logit_scale=loaded.logit_scale).to(device).eval()
    return encoder, eval_transform(loaded.model.image_preprocess), encoder.tokenizer
