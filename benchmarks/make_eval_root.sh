#!/usr/bin/env bash
# Arrange ../shared/data into the evaluation data-root layout (docs/data.md) with symlinks, nothing copied.
#
#   benchmarks/make_eval_root.sh [SHARED_DATA] [ROOT]      (defaults: ../shared/data, /tmp/protorkd-eval-root)
#
# ROOT/cifar10/{train,test}/<class>/*.jpg   <- cifar10_jpg (500 train / 1000 test images per class)
# ROOT/coco2017/{annotations,val2017}       <- coco_mini_captions (159 val images, 795 captions)
# ROOT/sts/{STS12-en-test,...,SICK}         <- sts (SentEval layout)
# The CLIP prompt file is not part of the root: pass it with
#   --zeroshot-metadata SHARED_DATA/clip_prompts/clip_zeroshot_prompts.json
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
shared="$(cd "${1:-$here/../shared/data}" && pwd)"
root="${2:-/tmp/protorkd-eval-root}"
for folder in cifar10_jpg coco_mini_captions sts; do
  [[ -d "$shared/$folder" ]] || { echo "missing $shared/$folder" >&2; exit 2; }
done
mkdir -p "$root/coco2017"
ln -sfn "$shared/cifar10_jpg" "$root/cifar10"
ln -sfn "$shared/coco_mini_captions/annotations" "$root/coco2017/annotations"
ln -sfn "$shared/coco_mini_captions/val2017" "$root/coco2017/val2017"
ln -sfn "$shared/sts" "$root/sts"
echo "$root"
