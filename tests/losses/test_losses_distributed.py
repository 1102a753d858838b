"""Every registered loss under 2-process gloo equals the 1-process loss on the concatenated batch.

Convention (see protorkd.losses.common): on every rank the value equals the single-process value;
the gradient w.r.t. a rank's own input rows is world_size x the single-process gradient of those
rows (so DDP's averaging yields the single-process gradient); loss-owned parameters get exactly the
single-process gradient; buffers (queues, centres, priors) stay identical. Checked after two steps,
with unequal local batches (3 and 5 rows).
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses import LOSSES, LossOptions, build_loss
from protorkd.losses.base import LossInputs
from protorkd.prototypes.clustering import ClusterState, broadcast_cluster_state

WORLD = 2
LOCAL_SIZES = (3, 5)
DIM = 4
TEACHER_DIM = 6
STEPS = 2
TRAINABLE = ("image", "text", "text_features_dropout", "image_features_view2")
BOTH_TOWERS_TRAIN = {"InfoNCE", "CLIP-KD", "ProtoCLIP", "VICReg", "BarlowTwins"}
AUXILIARY_CASE = "SimReg+SimCSE+BYOL"

CONFIG = dict(
    gather_with_grad=True,  # InfoNCE's own flag: without it DDP averaging gives 1/world_size of the gradient
    queue_size=12,  # two global batches of 8 wrap around the queue
    n_prototypes=16,
    rkd_angle_chunk=3,
    clip_kd_teacher_dim=TEACHER_DIM,
    w_clip_kd_intra=1.0,
    w_clip_kd_rkd=1.0,
    pbt=True,
    target_temperature=0.5,
)


def launch(worker, *args: str) -> None:
    """WORLD processes running worker(rank, *args). Forked, not spawned: a spawned child re-imports the main
    module, which re-runs pytest when pytest was started by a console script without a __main__ guard."""
    mp.start_processes(worker, args=args, nprocs=WORLD, start_method="fork")


def cases() -> list[str]:
    return [*LOSSES.names(), AUXILIARY_CASE]


def build(case: str) -> torch.nn.Module:
    torch.manual_seed(0)  # CLIP-KD's projections use the global RNG: same on every process
    if case == AUXILIARY_CASE:
        return build_loss("SimReg", LossOptions(**CONFIG, w_simcse=0.5, byol=True), DIM).double()
    loss = build_loss(case, LossOptions(**CONFIG), DIM).double()
    return loss


def cluster_state() -> ClusterState:
    generator = torch.Generator().manual_seed(7)

    def rand(*shape):  # float32 like cluster_episode's centroids (the broadcast sends float32)
        return torch.randn(*shape, generator=generator, dtype=torch.float32)

    return ClusterState(
        image_labels=torch.randint(0, 3, (10,), generator=generator),
        text_labels=torch.randint(0, 3, (10,), generator=generator),
        image_centroids=rand(3, DIM),
        text_centroids=rand(3, DIM),
        image_centroids_from_text=rand(3, DIM),
        text_centroids_from_image=rand(3, DIM),
        external_labels=torch.randint(0, 3, (10,), generator=generator),
        external_centroids=rand(3, 2),
        image_centroids_from_external=rand(3, DIM),
        text_centroids_from_external=rand(3, DIM),
    )


def make_steps() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    n = sum(LOCAL_SIZES)
    steps = []
    for _ in range(STEPS):

        def unit(width):
            return F.normalize(torch.randn(n, width, generator=generator, dtype=torch.float64), dim=1)

        steps.append(
            {
                "image": unit(DIM),
                "text": unit(DIM),
                "text_features_dropout": unit(DIM),
                "image_features_view2": unit(DIM),
                "teacher_image_features": unit(TEACHER_DIM),
                "teacher_text_features": unit(TEACHER_DIM),
                "indices": torch.randperm(10, generator=generator)[:n],
            }
        )
    return steps


def run_case(case: str, steps: list[dict[str, torch.Tensor]], rows: slice, state: ClusterState | None) -> dict:
    """Values, input gradients, parameter gradients per step and the final buffers of one loss."""
    loss = build(case)
    if case == "ProtoCLIP":
        loss.set_clusters(broadcast_cluster_state(state))
    teacher = "none" if case in BOTH_TOWERS_TRAIN else "text"
    record: dict = {"steps": []}
    for step in steps:
        leaves = {key: step[key][rows].clone().requires_grad_() for key in TRAINABLE}
        views = {key: leaves[key] for key in ("text_features_dropout", "image_features_view2")}
        separate = {key: step[key][rows] for key in ("teacher_image_features", "teacher_text_features")}
        inputs = LossInputs(
            image_features=leaves["image"],
            text_features=leaves["text"],
            image_features_unnormalized=leaves["image"],  # unit rows: CLIP-KD's projection input
            text_features_unnormalized=leaves["text"],
            teacher=teacher,
            indices=step["indices"][rows],
            separate_teachers=separate,
            **views,
        )
        loss.zero_grad(set_to_none=True)
        terms = loss(inputs)
        sum(terms.values()).backward()
        record["steps"].append(
            {
                "values": {name: value.detach().clone() for name, value in terms.items()},
                "input_grads": {
                    key: leaf.grad.clone() if leaf.grad is not None else torch.zeros_like(leaf)
                    for key, leaf in leaves.items()
                },
                "param_grads": {
                    name: param.grad.clone() if param.grad is not None else torch.zeros_like(param)
                    for name, param in loss.named_parameters()
                },
            }
        )
    record["buffers"] = {name: buffer.clone() for name, buffer in loss.state_dict().items()}
    return record


def _worker(rank: int, init_file: str, data_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        data = torch.load(data_file, weights_only=False)
        start = sum(LOCAL_SIZES[:rank])
        rows = slice(start, start + LOCAL_SIZES[rank])
        results = {}
        for case in cases():
            state = data["state"] if rank == 0 else None
            results[case] = run_case(case, data["steps"], rows, state)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_every_loss_under_two_process_gloo_equals_the_single_process_loss_on_the_concatenated_batch(tmp_path):
    steps, state = make_steps(), cluster_state()
    reference = {case: run_case(case, steps, slice(None), state) for case in cases()}
    torch.save({"steps": steps, "state": state}, tmp_path / "data.pt")
    launch(_worker, str(tmp_path / "init"), str(tmp_path / "data.pt"), str(tmp_path))

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        start = sum(LOCAL_SIZES[:rank])
        rows = slice(start, start + LOCAL_SIZES[rank])
        for case in cases():
            for step, (mine, single) in enumerate(zip(got[case]["steps"], reference[case]["steps"])):
                where = f"{case} rank {rank} step {step}"
                assert mine["values"].keys() == single["values"].keys(), where
                for name, value in single["values"].items():
                    torch.testing.assert_close(mine["values"][name], value, rtol=1e-9, atol=1e-12, msg=where + name)
                for key, grad in single["input_grads"].items():
                    torch.testing.assert_close(
                        mine["input_grads"][key], WORLD * grad[rows], rtol=1e-8, atol=1e-12, msg=f"{where} d/d{key}"
                    )
                for name, grad in single["param_grads"].items():
                    torch.testing.assert_close(
                        mine["param_grads"][name], grad, rtol=1e-8, atol=1e-12, msg=f"{where} d/d{name}"
                    )
            for name, buffer in reference[case]["buffers"].items():
                torch.testing.assert_close(got[case]["buffers"][name], buffer, msg=f"{case} rank {rank} {name}")
    assert math.isfinite(float(reference["RKD"]["steps"][1]["values"]["rkd_angle_loss"]))


# InfoNCE with unequal and empty local batches, with and without --local-loss: per step, the rows of rank 0 and 1
UNEQUAL_STEPS = ((3, 5), (4, 0))  # in the second step rank 1 has no readable sample


MIXUP_LAMS = (0.7, 0.4)  # each rank's lam with --mixup-alpha (its rows are paired within its own slice)


def run_infonce(
    local_loss: bool, steps: list[dict[str, torch.Tensor]], rank: int | None, mixed: bool = False
) -> list[dict]:
    """Per step: the value, the input gradients and the logit-scale gradient, on `rank`'s rows (None: all rows).

    `mixed`: the images were mixed per rank (MIXUP_LAMS); the one-process reference (rank None) scores the
    concatenated batch with soft targets written out here: lam on a row's own pair, 1 - lam on its mirror's
    within its rank's slice."""
    torch.manual_seed(0)
    loss = build_loss("InfoNCE", LossOptions(gather_with_grad=True, local_loss=local_loss), DIM).double()
    records = []
    for step, sizes in zip(steps, UNEQUAL_STEPS):
        start = 0 if rank is None else sum(sizes[:rank])
        rows = slice(None) if rank is None else slice(start, start + sizes[rank])
        image = step["image"][rows].clone().requires_grad_()
        text = step["text"][rows].clone().requires_grad_()
        loss.zero_grad(set_to_none=True)
        if mixed and rank is None:
            value = mixed_reference(image, text, loss.scale(), sizes)
        else:
            lams = torch.full((sizes[rank],), MIXUP_LAMS[rank], dtype=torch.float64) if mixed else None
            inputs = LossInputs(image_features=image, text_features=text, teacher="none", mixup_lams=lams)
            value = loss(inputs)["infonce_loss"]
        value.backward()
        records.append(
            {"value": value.detach(), "image": image.grad, "text": text.grad, "scale": loss.logit_scale.grad.clone()}
        )
    return records


def mixed_reference(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, sizes: tuple) -> torch.Tensor:
    """1/2 mean over rows of -sum_j target_ij log softmax_j, both directions, on the concatenated batch."""
    n = image.shape[0]
    targets = torch.zeros(n, n, dtype=torch.float64)
    start = 0
    for size, lam in zip(sizes, MIXUP_LAMS):
        for i in range(size):
            mirror = start + size - 1 - i
            targets[start + i, start + i] += lam
            targets[start + i, mirror] += 1 - lam
        start += size
    logits = scale * image @ text.T
    image_side = -(targets * torch.log_softmax(logits, dim=1)).sum(1).mean()
    text_side = -(targets.T * torch.log_softmax(logits.T, dim=1)).sum(1).mean()
    return 0.5 * (image_side + text_side)


CASES = ((False, False), (True, False), (False, True), (True, True))  # (local_loss, mixed)


def _infonce_worker(rank: int, init_file: str, data_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        steps = torch.load(data_file, weights_only=False)
        results = {(local, mixed): run_infonce(local, steps, rank, mixed) for local, mixed in CASES}
        torch.save(results, f"{out_dir}/infonce-rank{rank}.pt")
    finally:
        distributed.shutdown()


def test_infonce_with_unequal_and_empty_local_batches_matches_one_process_with_and_without_local_loss_and_mixup(
    tmp_path,
):
    generator = torch.Generator().manual_seed(3)
    steps = [
        {
            key: F.normalize(torch.randn(sum(sizes), DIM, generator=generator, dtype=torch.float64), dim=1)
            for key in ("image", "text")
        }
        for sizes in UNEQUAL_STEPS
    ]
    torch.save(steps, tmp_path / "steps.pt")
    launch(_infonce_worker, str(tmp_path / "init"), str(tmp_path / "steps.pt"), str(tmp_path))
    got = [torch.load(tmp_path / f"infonce-rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for local, mixed in CASES:
        single = run_infonce(local, steps, None, mixed)
        for index, (sizes, reference) in enumerate(zip(UNEQUAL_STEPS, single)):
            where = f"local_loss={local} mixed={mixed} step {index}"
            ranks = [got[rank][local, mixed][index] for rank in range(WORLD)]
            # DDP averages the W ranks' gradients: their mean loss is the one-process loss (each rank's own
            # value with the global loss, its share W * sum(own rows) / N with --local-loss)
            torch.testing.assert_close(sum(r["value"] for r in ranks) / WORLD, reference["value"], msg=where)
            torch.testing.assert_close(sum(r["scale"] for r in ranks) / WORLD, reference["scale"], msg=where)
            for rank, mine in enumerate(ranks):
                rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
                for key in ("image", "text"):  # the gather sums the ranks' gradients: W x the one-process rows
                    torch.testing.assert_close(mine[key], WORLD * reference[key][rows], msg=f"{where} rank {rank}")
                if not local:
                    torch.testing.assert_close(mine["value"], reference["value"], msg=where)
