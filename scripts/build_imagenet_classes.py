"""Build `src/protorkd/eval/prompts/imagenet_classes.json`: ImageNet's 1000 WordNet ids and the 200-class subsets
of ImageNet-A and ImageNet-R, from the datasets' own evaluation code (package data; do not edit by hand).

    git clone https://github.com/hendrycks/imagenet-r && git clone https://github.com/hendrycks/natural-adv-examples
    python scripts/build_imagenet_classes.py --imagenet-r imagenet-r/eval.py --imagenet-a natural-adv-examples/eval.py

- `wnids`: `all_wnids` of hendrycks/imagenet-r `eval.py` (@ 3131cac): the 1000 ILSVRC-2012 synsets in their
  label order (sorted), which is also the order of OpenAI CLIP's ImageNet class names;
- `imagenet_r`: the positions in `wnids` of `imagenet_r_wnids` (the same file; its `imagenet_r_mask`);
- `imagenet_a`: `indices_in_1k` of hendrycks/natural-adv-examples `eval.py` (@ 0777070): the keys of
  `thousand_k_to_200` whose value is not -1.

Both repositories are MIT-licensed (Copyright (c) 2019, 2020 Dan Hendrycks). The files are read as Python
syntax (`ast`), never executed. `--check` compares instead of writing and exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "protorkd" / "eval" / "prompts" / "imagenet_classes.json"


def assignments(path: Path) -> dict[str, object]:
    """{name: value} of the module-level assignments of literals in a Python file."""
    values = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return values


def build(imagenet_r: Path, imagenet_a: Path) -> dict[str, list]:
    r = assignments(imagenet_r)
    wnids, r_wnids = list(r["all_wnids"]), set(r["imagenet_r_wnids"])
    mapping = assignments(imagenet_a)["thousand_k_to_200"]
    a_indices = [k for k in mapping if mapping[k] != -1]
    if len(wnids) != 1000 or wnids != sorted(wnids) or len(set(wnids)) != 1000:
        raise SystemExit(f"{imagenet_r}: all_wnids is not 1000 sorted distinct synsets")
    if len(r_wnids) != 200 or not r_wnids <= set(wnids) or len(a_indices) != 200:
        raise SystemExit("expected 200 classes in each of ImageNet-R and ImageNet-A")
    if [mapping[k] for k in a_indices] != list(range(200)):
        raise SystemExit(f"{imagenet_a}: thousand_k_to_200 does not number its 200 classes in 1k order")
    return {
        "wnids": wnids,
        "imagenet_a": a_indices,
        "imagenet_r": [i for i, wnid in enumerate(wnids) if wnid in r_wnids],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagenet-r", type=Path, required=True, help="hendrycks/imagenet-r eval.py")
    parser.add_argument("--imagenet-a", type=Path, required=True, help="hendrycks/natural-adv-examples eval.py")
    parser.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing")
    args = parser.parse_args()
    text = json.dumps(build(args.imagenet_r, args.imagenet_a)) + "\n"
    if args.check:
        same = OUT.is_file() and OUT.read_text() == text
        print(f"{OUT.name}: {'identical' if same else 'DIFFERS'}")
        sys.exit(0 if same else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
