"""Read `protorkd export` folders with open_clip alone, in a process that never imports protorkd.

    python tests/support/open_clip_reader.py INPUTS.pt OUT.pt EXPORT [EXPORT ...]

Each EXPORT is a folder (read as `local-dir:FOLDER`) or an `hf-hub:USER/REPO` name. INPUTS.pt holds "images"
([B, 3, H, W] per export, keyed by EXPORT), "texts" (a list) and "files" (image paths). For each export it
writes to OUT.pt: image and text features (normalised, open_clip's own `encode_image` / `encode_text`), and
the preprocessed image files. It fails if protorkd was imported.
"""

from __future__ import annotations

import sys

import open_clip
import torch
from PIL import Image


def main() -> int:
    inputs_path, out_path, *folders = sys.argv[1:]
    inputs = torch.load(inputs_path, weights_only=True)
    out = {}
    for folder in folders:
        name = folder if folder.startswith("hf-hub:") else f"local-dir:{folder}"
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        tokenizer = open_clip.get_tokenizer(name)
        model.eval()
        with torch.no_grad():
            files = torch.stack([preprocess(Image.open(path)) for path in inputs["files"]])
            out[folder] = {
                "image": model.encode_image(inputs["images"][folder], normalize=True),
                "text": model.encode_text(tokenizer(inputs["texts"]), normalize=True),
                "files": files,
                "file_features": model.encode_image(files, normalize=True),
                "logit_scale": model.logit_scale.detach(),
            }
    imported = sorted(name for name in sys.modules if name == "protorkd" or name.startswith("protorkd."))
    assert not imported, f"protorkd was imported: {imported}"
    torch.save(out, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
