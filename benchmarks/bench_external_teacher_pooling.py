"""The external teacher's pooling and PCA: how much ProtoCLIP's choices change the features and their clusters.

ProtoCLIP's `src/utils/RoBERTa.py` pads every caption's tokens with id 0 to 77 positions (for RoBERTa id 0 is
`<s>`, not the padding id 1, so fairseq attends to them), averages the token features over all 77 positions,
L2-normalises, and fits faiss' PCAMatrix to 64 dimensions. `protorkd cache-teacher --export-npy` pools as the
teacher pools in training (sentence-transformers MiniLM: the mean over the caption's own tokens).

On the COCO mini captions of ../shared/data (MiniLM all-MiniLM-L6-v2 offline copy), this measures:
1. the cosine between the two poolings of each caption (the token mean vs ProtoCLIP's 77-position mean with the
   padding id 0 attended, the nearest analogue for a BERT tokenizer, whose id 0 is [PAD]), as they are and
   after centring each on its mean over the captions (the PCA subtracts the mean);
2. the agreement of ProtoCLIP's pipeline downstream (L2 normalisation, PCA 64, k-means with N/10 clusters, as
   ProtoCLIP's 20,000 clusters of 200,000 samples): AMI / ARI of the k-means labels and the share of captions
   whose nearest neighbour is the same, against the same numbers for two k-means seeds of one pooling;
3. the same agreement between this project's earlier export (no normalisation, torch.pca_lowrank with niter 4)
   and the current one (normalisation, faiss' exact PCA), both on the token mean.

    python benchmarks/bench_external_teacher_pooling.py [--data ../shared/data] [--clusters-per 10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

from protorkd.models.text_towers import resolve_sentence_transformer
from protorkd.prototypes.kmeans import kmeans
from protorkd.teachers.external import fit_pca, l2_normalized

ROOT = Path(__file__).resolve().parents[1]


def coco_captions(data: Path) -> list[str]:
    captions = []
    for split in ("train2017", "val2017"):
        annotations = json.loads((data / "coco_mini_captions" / "annotations" / f"captions_{split}.json").read_text())
        captions += [a["caption"].strip() for a in annotations["annotations"]]
    return captions


@torch.inference_mode()
def poolings(captions: list[str], batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """([N, 384] mean over each caption's tokens, [N, 384] ProtoCLIP's mean over 77 positions padded with id 0)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_sentence_transformer("all-MiniLM-L6-v2"), device="cpu")
    tokenizer, encoder = model.tokenizer, model[0].auto_model.eval()
    masked, padded77 = [], []
    for start in range(0, len(captions), batch_size):
        batch = captions[start : start + batch_size]
        tokens = tokenizer(batch, padding=True, truncation=True, max_length=77, return_tensors="pt")
        hidden = encoder(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        masked.append((hidden * mask).sum(1) / mask.sum(1))
        ids = torch.zeros(len(batch), 77, dtype=torch.long)  # RoBERTa.py: tokens_full = torch.zeros(77)
        for row, caption in enumerate(batch):
            token = tokenizer(caption, truncation=True, max_length=77)["input_ids"]
            ids[row, : len(token)] = torch.tensor(token)
        hidden77 = encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state  # nothing masked
        padded77.append(hidden77.mean(dim=1))
    return torch.cat(masked).numpy(), torch.cat(padded77).numpy()


def earlier_export(features: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """This project's export before issue 23: no normalisation, torch.pca_lowrank (niter 4) on the features."""
    data = torch.from_numpy(features.astype(np.float32))
    mean = data.mean(dim=0)
    torch.manual_seed(seed)
    _, _, components = torch.pca_lowrank(data - mean, q=min(dim + 10, *data.shape), center=False, niter=4)
    return ((data - mean) @ components[:, :dim]).numpy()


def nearest_neighbours(features: np.ndarray) -> np.ndarray:
    rows = l2_normalized(features)
    similarity = rows @ rows.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def agreement(first: np.ndarray, second: np.ndarray, k: int, seeds: tuple[int, int] = (1234, 1234)) -> str:
    a = kmeans(first, k, seed=seeds[0], gpu=False).labels
    b = kmeans(second, k, seed=seeds[1], gpu=False).labels
    same_neighbour = float((nearest_neighbours(first) == nearest_neighbours(second)).mean())
    ami, ari = adjusted_mutual_info_score(a, b), adjusted_rand_score(a, b)
    return f"AMI {ami:.3f}  ARI {ari:.3f}  same nearest neighbour {100 * same_neighbour:.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--clusters-per", type=int, default=10, help="captions per k-means cluster (ProtoCLIP: 10)")
    parser.add_argument("--pca-dim", type=int, default=64)
    args = parser.parse_args()
    captions = coco_captions(args.data)
    masked, padded77 = poolings(captions)
    cosine = (l2_normalized(masked) * l2_normalized(padded77)).sum(axis=1)
    centred = [l2_normalized(x) - l2_normalized(x).mean(axis=0) for x in (masked, padded77)]
    centred_cosine = (l2_normalized(centred[0]) * l2_normalized(centred[1])).sum(axis=1)
    k = len(captions) // args.clusters_per
    print(f"{len(captions)} COCO mini captions, MiniLM (all-MiniLM-L6-v2), k-means k = {k}, PCA {args.pca_dim}")
    print(
        f"cosine(token mean, 77-position mean): mean {cosine.mean():.4f}  median {np.median(cosine):.4f}  "
        f"5th percentile {np.percentile(cosine, 5):.4f}  min {cosine.min():.4f}"
    )
    print(
        f"the same after centring each pooling on its mean (what the PCA sees): mean {centred_cosine.mean():.4f}  "
        f"median {np.median(centred_cosine):.4f}  5th percentile {np.percentile(centred_cosine, 5):.4f}"
    )
    exported = {
        name: fit_pca(features, args.pca_dim).apply(features)
        for name, features in (("token mean", masked), ("77-position mean", padded77))
    }
    print("ProtoCLIP's pipeline (normalise, exact PCA, k-means), token mean vs 77-position mean:")
    print("   ", agreement(exported["token mean"], exported["77-position mean"], k))
    print("the same pooling (token mean), two k-means seeds (the noise floor):")
    print("   ", agreement(exported["token mean"], exported["token mean"], k, seeds=(1234, 1235)))
    print("token mean, earlier export (raw, pca_lowrank niter 4) vs current (normalised, faiss exact PCA):")
    print("   ", agreement(earlier_export(masked, args.pca_dim), exported["token mean"], k))


if __name__ == "__main__":
    main()
