"""The model card every export carries: README.md in the Hugging Face format (YAML front matter, then Markdown).

The front matter names the library that loads the folder, the teachers that are hub models (`base_model`), and
under `protorkd:` the student, teachers, loss, data, epochs and the exact training command; the body repeats
them and gives the final evaluation of the run (its `results.jsonl` line for the exported epoch), each metric
with the protocol that computed it (`eval.records.protocol`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protorkd import __version__
from protorkd.eval.records import protocol


@dataclass
class CardFacts:
    """What a model card says about the model and the run that trained it."""

    name: str
    student: str
    teachers: list[str]
    loss: str
    data: str
    epochs: int | None
    command: str
    base_models: list[str] = field(default_factory=list)  # teachers that are hub models
    results: dict[str, float] = field(default_factory=dict)  # flat metric keys of the final evaluation
    results_epoch: int | None = None
    results_source: str = ""  # e.g. "results.jsonl, epoch 4 (training)"
    notes: list[str] = field(default_factory=list)  # how the export expresses the model


def final_results(results: Path, epoch: int | None) -> tuple[dict[str, float], int | None, str]:
    """The metrics of `results.jsonl` for `epoch` (every line for it merged, later lines winning: training's
    evaluation, then `protorkd eval`'s), else of its last evaluated epoch; ({}, None, "") without any."""
    by_epoch: dict[int, dict[str, float]] = {}
    sources: dict[int, list[str]] = {}
    if not Path(results).is_file():
        return {}, None, ""
    for line in Path(results).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            continue
        metrics = {k: v for k, v in record.items() if "/" in k and isinstance(v, (int, float))}
        by_epoch.setdefault(record["epoch"], {}).update(metrics)
        sources.setdefault(record["epoch"], []).append(str(record.get("evaluated_by", "training")))
    chosen = epoch if epoch in by_epoch else (max(by_epoch) if by_epoch else None)
    if chosen is None:
        return {}, None, ""
    origin = ", ".join(dict.fromkeys(sources[chosen]))
    return by_epoch[chosen], chosen, f"{Path(results).name}, epoch {chosen} ({origin})"


def checked_note(differences: dict[str, float], reader: str) -> str:
    """The card's line on the export's own check: how far `reader`'s features are from the model's."""
    shown = ", ".join(f"{differences[key]:.1e} ({key})" for key in sorted(differences))
    return (
        f"Checked when exported: {reader} reproduces the model's normalised features to {shown} (largest "
        "absolute difference, fp32)."
    )


def _yaml(value: Any) -> str:
    """A YAML scalar: JSON's quoting is valid YAML."""
    return json.dumps(value)


def render_card(facts: CardFacts, *, export_format: str) -> str:
    """README.md for an export in `export_format` ("open_clip" or "onnx")."""
    lines = ["---"]
    lines.append(f"library_name: {'open_clip' if export_format == 'open_clip' else 'onnx'}")
    lines.append("pipeline_tag: zero-shot-image-classification")
    lines += ["tags:", "- clip", "- knowledge-distillation", "- protorkd", f"- {export_format}"]
    if facts.base_models:
        lines += ["base_model:"] + [f"- {_yaml(model)}" for model in facts.base_models]
    lines.append("protorkd:")
    for key, value in (
        ("student", facts.student),
        ("teachers", facts.teachers),
        ("loss", facts.loss),
        ("data", facts.data),
        ("epochs", facts.epochs),
        ("command", facts.command),
        ("version", __version__),
    ):
        lines.append(f"  {key}: {_yaml(value)}")
    lines += ["---", "", f"# {facts.name}", ""]
    lines.append(f"A compact image-text encoder distilled with ProtoRKD (protorkd {__version__}).")
    lines += ["", "| | |", "|---|---|"]
    lines.append(f"| student | {facts.student} |")
    lines.append(f"| teachers | {'; '.join(facts.teachers) or 'none (trained CLIP-style)'} |")
    lines.append(f"| loss | {facts.loss} |")
    lines.append(f"| data | {facts.data} |")
    lines.append(f"| epochs | {facts.epochs} |")
    lines += ["", "Trained with:", "", "```", facts.command, "```", ""]
    lines += ["## Evaluation", ""]
    if facts.results:
        lines += [
            f"From {facts.results_source}; percentages except the probes' chosen `l2` and `weight_decay` and the "
            "feature statistics.",
            "",
        ]
        lines += ["| metric | value | protocol |", "|---|---|---|"]
        shown_protocols = set()
        for key, value in sorted(facts.results.items()):
            shown = "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4g}"
            words = protocol(key)
            lines.append(f"| `{key}` | {shown} | {'' if words in shown_protocols else words} |")
            shown_protocols.add(words)
    else:
        lines.append("The run has no evaluation for this epoch (`protorkd eval --checkpoint ...` adds one).")
    lines += ["", "## Use", ""]
    lines += _usage(export_format)
    if facts.notes:
        lines += ["", "## How this export expresses the model", ""] + [f"- {note}" for note in facts.notes]
    return "\n".join(lines) + "\n"


def _usage(export_format: str) -> list[str]:
    if export_format == "open_clip":
        return [
            "```python",
            "import open_clip, torch",
            'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/THIS/FOLDER")',
            'tokenizer = open_clip.get_tokenizer("local-dir:PATH/TO/THIS/FOLDER")',
            "with torch.no_grad():",
            "    image_features = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)",
            '    text_features = model.encode_text(tokenizer(["a photo of a cat"]), normalize=True)',
            "```",
            "",
            "`protorkd.load(PATH)` gives the same model, preprocessing and tokenizer.",
        ]
    return [
        "```python",
        "import onnxruntime",
        'image_session = onnxruntime.InferenceSession("image_encoder.onnx")',
        'features = image_session.run(None, {"images": images})[0]  # images: [B, 3, S, S] float32, preprocessed',
        "```",
        "",
        "`protorkd_onnx.json` lists each graph's inputs, the image preprocessing and the tokenizer to use.",
    ]


def retarget_card(card: str, export_format: str, notes: list[str]) -> str:
    """Another export's card for this `export_format`: its front matter's library and tags follow the format,
    and `notes` are appended."""
    library = "open_clip" if export_format == "open_clip" else "onnx"
    lines = card.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("library_name:"):
            lines[index] = f"library_name: {library}"
        elif line in ("- open_clip", "- onnx"):
            lines[index] = f"- {export_format}"
    return "\n".join([*lines, "", f"## {export_format} conversion", "", *[f"- {note}" for note in notes]]) + "\n"
