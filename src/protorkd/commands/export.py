"""`protorkd export MODEL --out DIR [--format open_clip|onnx]`: a trained model in a standard layout.

MODEL is a checkpoint, a run folder (its latest checkpoint) or an export folder (written again: to move it,
or to convert an open_clip export to ONNX). `open_clip` (the default) writes open_clip's own hub layout, which
`open_clip.create_model_and_transforms("local-dir:DIR")` loads without protorkd; `onnx` writes one graph per
encoder. Both carry a model card (README.md) naming the run's student, teachers, loss, data, epochs, command
and final evaluation. docs/export.md has the details and how to publish the folder on the Hugging Face Hub.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protorkd.export.model_card import CardFacts
    from protorkd.loading import LoadedCheckpoint


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a trained model as an open_clip folder or ONNX graphs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help="a checkpoint (.pt), a run folder (its latest checkpoint) or an export folder",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to create (must not exist, or be empty)")
    parser.add_argument(
        "--format",
        choices=("open_clip", "onnx"),
        default="open_clip",
        help="open_clip: open_clip's hub layout (config + safetensors), loadable without protorkd; onnx: an image "
        "and a text graph with a dynamic batch (default: open_clip)",
    )
    parser.add_argument(
        "--hub-id",
        metavar="USER/REPO",
        help="open_clip format: lay the folder out for this Hugging Face Hub repository, so that once uploaded "
        "(docs/export.md) open_clip loads it as hf-hub:USER/REPO (default: a folder open_clip loads as "
        "local-dir:DIR)",
    )
    parser.set_defaults(func=run)


def _teachers(loaded: LoadedCheckpoint) -> tuple[list[str], list[str]]:
    """(the run's teachers in words, the hub ids among them)."""
    from protorkd.export.text import hub_id_of

    options = loaded.model_options
    teachers, hub = [], []
    lock_image, lock_text = options.locks
    for locked, builder, name, tag, role in (
        (lock_text, options.text_model_builder, options.text_model, options.text_model_tag, "text tower"),
        (lock_image, options.image_model_builder, options.image_model, options.image_model_tag, "image tower"),
    ):
        if locked:
            teachers.append(f"{builder}:{name}{'@' + tag if tag else ''} (the locked {role})")
            if builder in ("sbert", "huggingface") and hub_id_of(loaded.model.text_tower):
                hub.append(hub_id_of(loaded.model.text_tower))
    if options.clip_teacher_model:
        tag = f"@{options.clip_teacher_tag}" if options.clip_teacher_tag else ""
        teachers.append(f"open_clip:{options.clip_teacher_model}{tag} (CLIP-KD teacher)")
    if options.extra_text_teacher:
        teachers.append(f"{options.extra_text_teacher_builder}:{options.extra_text_teacher} (extra text teacher)")
    return teachers, hub


def _student(loaded: LoadedCheckpoint) -> str:
    model, (lock_image, lock_text) = loaded.model, loaded.model_options.locks
    options = loaded.model_options
    parts = []
    for tower, layers, locked in (
        (model.image_tower, options.image_head_n_layers, lock_image),
        (model.text_tower, options.text_head_n_layers, lock_text),
    ):
        head = {0: "no head", 1: "a linear head"}.get(layers, f"a {layers}-layer MLP head")
        parts.append(f"{tower.name} ({'locked' if locked else 'trained'}) with {head}")
    return f"{' + '.join(parts)}, {model.embed_dim}-d joint space"


def card_facts(loaded: LoadedCheckpoint) -> CardFacts:
    from protorkd.commands import common
    from protorkd.export.model_card import CardFacts, final_results
    from protorkd.params import train_command

    run = common.training_run(loaded)
    teachers, hub = _teachers(loaded)
    if run is None:
        loss, data, command = "unknown (the checkpoint stores no flags)", "unknown", "unknown"
    else:
        loss = run.loss.loss + (f" (weights {run.loss.loss_weights})" if run.loss.loss_weights else "")
        data = (
            run.data.train_data or f"the built-in demo corpus ({run.data.demo_size} pairs, seed {run.data.demo_seed})"
        )
        command = train_command(run)
    results, epoch, source = {}, None, ""
    if loaded.experiment_dir is not None:
        results, epoch, source = final_results(loaded.experiment_dir / "results.jsonl", loaded.epoch)
    notes = []
    if loaded.model.image_projection_head is not None:
        notes.append("ProtoCLIP's projection heads are training-only (no evaluation reads them) and are not exported.")
    return CardFacts(
        name=f"{loaded.name}-epoch{loaded.epoch}" if loaded.epoch is not None else loaded.name,
        student=_student(loaded),
        teachers=teachers,
        loss=loss,
        data=data,
        epochs=loaded.epoch,
        command=command,
        base_models=hub,
        results=results,
        results_epoch=epoch,
        results_source=source,
        notes=notes,
    )


def run(args: argparse.Namespace) -> int:
    from protorkd.errors import UsageError
    from protorkd.export import onnx_format
    from protorkd.export.open_clip_format import refuse_existing, relocate_open_clip, write_open_clip
    from protorkd.loading import checkpoint_path, load_model_from_checkpoint, model_kind

    kind = model_kind(args.model)
    refuse_existing(args.out)
    if args.hub_id and (args.format != "open_clip" or kind != "checkpoint"):
        raise UsageError("--hub-id lays out an open_clip export of a checkpoint or run folder (--format open_clip)")
    if args.hub_id and args.hub_id.count("/") != 1:
        raise UsageError(f"--hub-id {args.hub_id!r}: expected USER/REPO")
    if kind == "open_clip" and args.format == "open_clip":
        relocate_open_clip(args.model, args.out)
    elif kind == "open_clip":
        onnx_format.open_clip_folder_to_onnx(args.model, args.out)
    elif kind == "onnx":
        raise UsageError(f"{args.model} is an ONNX export already; export its checkpoint instead")
    else:
        loaded = load_model_from_checkpoint(checkpoint_path(args.model))
        facts = card_facts(loaded)
        if args.format == "open_clip":
            differences = write_open_clip(loaded.model, loaded.model_options, args.out, logit_scale=loaded.logit_scale,
                                          facts=facts, hub_id=args.hub_id)  # fmt: skip
        else:
            differences = onnx_format.checkpoint_to_onnx(loaded.model, args.out, logit_scale=loaded.logit_scale,
                                                         facts=facts)  # fmt: skip
        print("checked: " + ", ".join(f"{k} features within {v:.1e}" for k, v in sorted(differences.items())))
    print(f"wrote {args.format} export to {args.out}")
    return 0
