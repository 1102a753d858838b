"""The loss flags as a library spec: what the loss factories in `protorkd.losses` read."""

from __future__ import annotations

from dataclasses import dataclass

from protorkd.options import Rule, flag

NEVER_OR_AT_LEAST_ONE = Rule("-1 (never) or at least 1", lambda value: value == -1 or value >= 1)
# Upper bounds of the flags that size the loss' own tensors (a queue or prototypes of N x D, logits of B x N)
MAX_QUEUE = 2**20
MAX_PROTOTYPES = 2**18
MAX_CLUSTERS = 1_000_000
MAX_WIDTH = 16384


@dataclass
class LossOptions:
    """Every loss hyperparameter (the `loss` flags of `protorkd train`); each factory reads the ones it needs."""

    loss: str = flag(
        "InfoNCE",
        "distillation loss (see `protorkd train --list-losses`), or a weighted sum of them written A+B "
        "(e.g. InfoNCE+RKD, weights from --loss-weights)",
    )
    loss_weights: str = flag(
        "", "weights of the losses summed by --loss A+B, comma-separated, e.g. 1,0.5 (default: 1 each)"
    )
    w_distill: float = flag(1.0, "weight of the main distillation loss", minimum=0.0)
    temperature: float = flag(
        0.07,
        "initial value of learnable temperatures (InfoNCE, CLIP-KD's student, ProtoCLIP's InfoNCE and prototypes)",
        above=0,
    )
    gather_with_grad: bool = flag(
        False,
        "under DDP, let gradients flow back through the cross-process feature gather, so N processes compute the "
        "gradient of one process on the concatenated batch; without it (open_clip's default) each rank's rows get "
        "the gradient through their own copy only, 1/N of that after DDP's average (docs/method.md)",
    )
    distill_batch: str = flag(
        "local",
        "under DDP, the rows a distillation loss (SimReg, RKD, CompRess, SEED, VICReg, BarlowTwins, DINO, ProtoCPC, "
        "ProtoRKD, and the --w-simcse / --byol terms beside them) computes over: local = each rank's own batch, "
        "with ITRA's all-reduced statistics and SEED's shared queue (ITRA gathers only for InfoNCE); global = the "
        "gathered global batch. InfoNCE, ProtoCLIP and CLIP-KD always use the global batch, as their originals",
        ("local", "global"),
    )
    local_loss: bool = flag(False, "score only local rows against the global batch (memory-saving, same gradient)")
    # Relational KD (RKD; also the optional relational term of CLIP-KD)
    w_rkd_d: float = flag(0.5, "RKD: weight of the distance-wise term", minimum=0.0)
    w_rkd_a: float = flag(1.0, "RKD: weight of the angle-wise term (0 skips its O(B^3) computation)", minimum=0.0)
    rkd_angle_chunk: int = flag(
        0,
        "RKD: anchors per chunk of the angle term (0 = automatic, about 2^26 triplets per chunk)",
        minimum=0,
    )
    # Queue-based KD (CompRess-1q, CompRess-2q, SEED)
    queue_size: int = flag(
        65536, "CompRess/SEED: memory-queue length (features of past global batches)", minimum=1, maximum=MAX_QUEUE
    )
    queue_init: str = flag(
        "random",
        "CompRess/SEED: how the queues start. random: ITRA's random rows (drawn from --seed), the whole queue "
        "scored from the first step; empty: no rows, only the filled part scored (the first step's value is 0)",
        ("random", "empty"),
    )
    queue_temperature: float = flag(
        0.04, "CompRess: temperature of the similarity distributions over the queue", above=0
    )
    seed_student_temperature: float = flag(0.07, "SEED: student temperature", above=0)
    seed_teacher_temperature: float = flag(1e-4, "SEED: teacher temperature", above=0)
    # Redundancy reduction (VICReg, BarlowTwins)
    vicreg_invariance: float = flag(25.0, "VICReg: weight of the invariance (MSE) term", minimum=0.0)
    vicreg_variance: float = flag(25.0, "VICReg: weight of the variance (std hinge) term", minimum=0.0)
    vicreg_covariance: float = flag(1.0, "VICReg: weight of the covariance term", minimum=0.0)
    barlow_lambda: float = flag(0.0051, "BarlowTwins: weight of the off-diagonal (redundancy) term", minimum=0.0)
    # Shared-prototype KD (DINO, ProtoCPC, ProtoRKD)
    n_prototypes: int = flag(
        65536,
        "DINO/ProtoCPC/ProtoRKD: learnable prototypes shared by teacher and student",
        minimum=1,
        maximum=MAX_PROTOTYPES,
    )
    dino_teacher_temp: float = flag(0.04, "DINO/ProtoCPC/ProtoRKD: teacher (sharpening) temperature", above=0)
    dino_student_temp: float = flag(0.1, "DINO/ProtoCPC/ProtoRKD: student temperature", above=0)
    center_momentum: float = flag(
        0.9, "DINO/ProtoRKD: EMA momentum of the teacher centre; ProtoCPC: of the prior", minimum=0.0, maximum=1.0
    )
    # Auxiliary terms that combine with any loss
    w_simcse: float = flag(
        0.0, "weight of dropout SimCSE on the text tower (needs a trainable text tower)", minimum=0.0
    )
    byol: bool = flag(False, "add BYOL-style MSE of a second augmented image view onto the detached first view")
    w_byol: float = flag(1.0, "weight of the --byol term", minimum=0.0)
    # CLIP-KD (locked CLIP teacher -> CLIP student)
    w_clip: float = flag(
        1.0, "ProtoCLIP/CLIP-KD: weight of InfoNCE between the student image and text features", minimum=0.0
    )
    w_clip_kd_logit: float = flag(
        1.0, "CLIP-KD: weight of the image-text logit distillation (KL, both directions)", minimum=0.0
    )
    w_clip_kd_fd: float = flag(
        2000.0,
        "CLIP-KD: weight of feature distillation, per-element MSE summed over the two modalities (CLIP-KD's "
        "alpha_fd_loss 2000; = 2000 / D_t x the squared L2 distance, for any teacher width D_t)",
        minimum=0.0,
    )
    w_clip_kd_icl: float = flag(
        1.0,
        "CLIP-KD: weight of interactive contrastive learning (student vs teacher, its own learnable scale)",
        minimum=0.0,
    )
    w_clip_kd_intra: float = flag(0.0, "CLIP-KD: weight of intra-modal similarity-distribution KL", minimum=0.0)
    w_clip_kd_rkd: float = flag(0.0, "CLIP-KD: weight of intra-modal RKD (uses --w-rkd-d/--w-rkd-a)", minimum=0.0)
    clip_kd_teacher_dim: int = flag(
        -1,
        "CLIP-KD: width of the CLIP teacher's features (set from the teacher in training; 0 = no CLIP teacher, "
        "-1 = the student's joint width)",
        minimum=-1,
        maximum=MAX_WIDTH,
    )
    clip_kd_text_teacher_dim: int = flag(
        0,
        "CLIP-KD: width of the --extra-text-teacher features (set from the teacher in training; 0 = none)",
        minimum=0,
        maximum=MAX_WIDTH,
    )
    w_clip_kd_text_teacher: float = flag(
        1.0,
        "CLIP-KD: weight of the --extra-text-teacher terms (it stands in for both modalities)",
        minimum=0.0,
    )
    clip_kd_teacher_temperature: float = flag(
        0.01,
        "CLIP-KD: teacher temperature when the loop provides no extra['teacher_logit_scale']",
        above=0,
    )
    # ProtoCLIP (k-means prototypes, back translation, external teacher)
    w_proto: float = flag(1.0, "ProtoCLIP: weight of the prototype loss", minimum=0.0)
    w_proto_external: float = flag(
        1.0, "ProtoCLIP: weight of the external-teacher prototype loss (needs --PBT)", minimum=0.0
    )
    infonce_warmup_epoch: int = flag(0, "ProtoCLIP: epochs before this index use only InfoNCE", minimum=0)
    k: int = flag(
        20000,
        "ProtoCLIP: number of k-means clusters (prototypes); at most the episode size",
        minimum=1,
        maximum=MAX_CLUSTERS,
    )
    kmeans_max_iter: int = flag(20, "ProtoCLIP: k-means iterations", minimum=1)
    kmeans_nredo: int = flag(1, "ProtoCLIP: k-means restarts (the best objective is kept)", minimum=1)
    clustering_frequency: int = flag(
        1, "ProtoCLIP: re-cluster every N epochs (-1 = never, i.e. plain InfoNCE)", rule=NEVER_OR_AT_LEAST_ONE
    )
    lit_start_epoch: int = flag(
        -1,
        "Locked-image tuning from epoch N (1-based; -1 = never): from then on the image tower's learning rate is 0 "
        "and ProtoCLIP uses only InfoNCE (ProtoCLIP's recipe: the last episode)",
        rule=NEVER_OR_AT_LEAST_ONE,
    )
    cluster_features: str = flag(
        "episode",
        "ProtoCLIP: what is clustered. episode: before training on an episode, its features from one no-grad "
        "eval-mode pass of one model snapshot (ProtoCLIP's method; every sample gets a label). previous-epoch: "
        "the features the previous epoch's training passes computed (cheaper, one epoch stale; samples the "
        "previous episode did not draw get no label)",
        ("episode", "previous-epoch"),
    )
    target_temperature: float = flag(
        -1.0, "ProtoCLIP: soft-target temperature over teacher centroids (<=0: hard one-hot labels)"
    )
    pbt: bool = flag(False, "ProtoCLIP: prototypical back translation (required by the external teacher)", name="--PBT")
    external_teacher: str | None = flag(None, "ProtoCLIP: .npy of external teacher features, one row per corpus row")
    external_teacher_dim: int = flag(
        64, "ProtoCLIP: width of the external teacher features (checked on load)", minimum=1, maximum=MAX_WIDTH
    )
