"""Build the zero-shot prompt files shipped in `src/protorkd/eval/prompts/` (package data).

    python scripts/build_prompts.py --clip ../shared/data/clip_prompts/clip_zeroshot_prompts.json \
        --elevater Elevater_Toolkit_IC/vision_benchmark/datasets/prompts.py

- `clip_zeroshot_prompts.json`: OpenAI CLIP's class names and templates for 27 datasets, from its
  `data/prompts.md` (26 datasets) and `notebooks/Prompt_Engineering_for_ImageNet.ipynb` (ImageNet), as
  parsed into `{dataset: {"classes", "templates"}}` in `clip_zeroshot_prompts.json` (openai/CLIP @ d05afc4,
  MIT). Copied entry by entry after checking its shape.
- `elevater_prompts.json`: the ELEVATER toolkit's `class_map` and `template_map`
  (`vision_benchmark/datasets/prompts.py`, Computer-Vision-in-the-Wild/Elevater_Toolkit_IC @ 00d0af7, MIT),
  keyed by the toolkit's dataset names (the vision-datasets hub names). The file is read as Python syntax
  (`ast`), never executed. The toolkit maps `cifar-10` to its CIFAR-100 templates; that is kept.

Either option may be left out to rebuild one file. `--check` compares instead of writing and exits 1 on a
difference (`tests/eval/test_prompts.py` runs it on `../shared/data` when present).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "protorkd" / "eval" / "prompts"
CLIP_FILE = "clip_zeroshot_prompts.json"
ELEVATER_FILE = "elevater_prompts.json"


def checked(entries: dict, source: Path) -> dict:
    """`entries` with each dataset's classes (strings, or lists of synonyms) and `{}` templates verified."""
    for name, entry in entries.items():
        classes, templates = entry.get("classes"), entry.get("templates")
        if not isinstance(classes, list) or not classes:
            raise SystemExit(f"{source}: {name} has no class list")
        if not all(isinstance(c, str) or (isinstance(c, list) and c) for c in classes):
            raise SystemExit(f"{source}: {name} has a class that is neither a name nor a list of synonyms")
        if not isinstance(templates, list) or not templates or any("{}" not in t for t in templates):
            raise SystemExit(f"{source}: every template of {name} needs a '{{}}' placeholder")
    return {name: {"classes": e["classes"], "templates": e["templates"]} for name, e in entries.items()}


def clip_prompts(path: Path) -> dict:
    return checked(json.loads(path.read_text(encoding="utf-8")), path)


def elevater_prompts(path: Path) -> dict:
    """{hub name: {classes, templates}} from the toolkit's prompts.py (module-level list literals and two
    dicts of names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lists, maps = {}, {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if isinstance(node.value, ast.List):
            lists[name] = ast.literal_eval(node.value)
        elif isinstance(node.value, ast.Dict):
            maps[name] = {ast.literal_eval(k): v.id for k, v in zip(node.value.keys, node.value.values)}
    if "class_map" not in maps or "template_map" not in maps:
        raise SystemExit(f"{path}: no class_map / template_map (is this vision_benchmark/datasets/prompts.py?)")
    entries = {
        hub: {"classes": lists[variable], "templates": lists[maps["template_map"][hub]]}
        for hub, variable in maps["class_map"].items()
    }
    return checked(entries, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, help="clip_zeroshot_prompts.json (../shared/data/clip_prompts/)")
    parser.add_argument("--elevater", type=Path, help="the ELEVATER toolkit's vision_benchmark/datasets/prompts.py")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default: {OUT})")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args()
    built = {}
    if args.clip:
        built[CLIP_FILE] = clip_prompts(args.clip)
    if args.elevater:
        built[ELEVATER_FILE] = elevater_prompts(args.elevater)
    if not built:
        parser.error("give --clip and/or --elevater")
    status = 0
    for name, entries in built.items():
        text = json.dumps(entries, indent=1, ensure_ascii=False) + "\n"
        target = args.out / name
        if args.check:
            same = target.is_file() and target.read_text(encoding="utf-8") == text
            print(f"{target}: {'up to date' if same else 'DIFFERS'}")
            status |= not same
        else:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target} ({len(entries)} datasets)")
    return status


if __name__ == "__main__":
    sys.exit(main())
