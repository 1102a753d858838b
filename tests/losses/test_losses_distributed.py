"""Every registered loss under 3-process gloo, with unequal local batches, against one process.

The convention (protorkd.losses.common): a loss computes over the rows its original computes over.
* Global batch (InfoNCE, ProtoCLIP, CLIP-KD; every loss with --distill-batch global): on every rank the value is
  the one-process value on the concatenated batch and loss-owned parameters get the one-process gradient; a
  rank's own input rows get W x the one-process gradient with --gather-with-grad, 1 x without (open_clip's).
* Local batch (ITRA's distillers, the default): each rank's value and gradients are the one-process ones on its
  own rows, except for the statistics ITRA all-reduces (Barlow Twins' correlation, DINO's / ProtoRKD's centre,
  ProtoCPC's prior, SEED's queue), which are the whole batch's; CompRess keeps a queue per rank.
Three processes with batches of 3, 5 and 2 rows: an offset of rank x B_0 (which two processes cannot tell from the
right one) puts rank 2's rows at 6 instead of 8. Every launch fails after a deadline instead of hanging.
"""

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses import LOSSES, LossOptions, build_loss
from protorkd.losses.base import LossInputs
from protorkd.losses.redundancy import BarlowTwins
from protorkd.prototypes.clustering import ClusterState, broadcast_cluster_state

WORLD = 3
LOCAL_SIZES = (3, 5, 2)
DIM = 4
TEACHER_DIM = 6
STEPS = 2
DEADLINE_SECONDS = 180
TRAINABLE = ("image", "text", "text_features_dropout", "image_features_view2")
BOTH_TOWERS_TRAIN = {"InfoNCE", "CLIP-KD", "ProtoCLIP", "VICReg", "BarlowTwins"}
ALWAYS_GLOBAL = {"InfoNCE", "CLIP-KD", "ProtoCLIP"}
GLOBAL_STATISTICS = {"SEED", "DINO", "ProtoCPC", "ProtoRKD"}  # local loss, every rank's rows in the state
AUXILIARY_CASE = "SimReg+SimCSE+BYOL"

CONFIG = dict(
    queue_size=20,  # two global batches of 10 wrap around the queue
    n_prototypes=16,
    rkd_angle_chunk=3,
    clip_kd_teacher_dim=TEACHER_DIM,
    w_clip_kd_intra=1.0,
    w_clip_kd_rkd=1.0,
    pbt=True,
    target_temperature=0.5,
)
MODES = {  # (--distill-batch, --gather-with-grad)
    "global-with-grad": ("global", True),
    "global": ("global", False),
    "local": ("local", False),
}


def launch(worker, *args: str) -> None:
    """WORLD processes running worker(rank, *args), killed and failed after DEADLINE_SECONDS (a rank waiting in a
    collective that another never entered would otherwise hang the suite). Forked, not spawned: a spawned child
    re-imports the main module, which re-runs pytest when pytest was started by a console script."""
    context = mp.start_processes(worker, args=args, nprocs=WORLD, start_method="fork", join=False)
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD}-process run did not finish in {DEADLINE_SECONDS} s (a hang in a collective)")


def cases() -> list[str]:
    return [*LOSSES.names(), AUXILIARY_CASE]


def build(case: str, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)  # CLIP-KD's projections use the global RNG: same on every process
    distill_batch, with_grad = MODES[mode]
    options = dict(CONFIG, distill_batch=distill_batch, gather_with_grad=with_grad)
    if case == AUXILIARY_CASE:
        return build_loss("SimReg", LossOptions(**options, w_simcse=0.5, byol=True), DIM).double()
    return build_loss(case, LossOptions(**options), DIM).double()


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


def run_case(
    case: str, mode: str, steps: list[dict[str, torch.Tensor]], rows: slice, state: ClusterState | None
) -> dict:
    """Values, input gradients, parameter gradients per step and the final buffers of one loss."""
    loss = build(case, mode)
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
                "buffers": {name: buffer.clone() for name, buffer in loss.state_dict().items()},
            }
        )
    return record


def rank_rows(rank: int) -> slice:
    start = sum(LOCAL_SIZES[:rank])
    return slice(start, start + LOCAL_SIZES[rank])


def _worker(rank: int, init_file: str, data_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        data = torch.load(data_file, weights_only=False)
        results = {}
        for mode in MODES:
            for case in cases():
                if mode == "local" and case in ALWAYS_GLOBAL:
                    continue
                state = data["state"] if rank == 0 else None
                results[mode, case] = run_case(case, mode, data["steps"], rank_rows(rank), state)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        distributed.shutdown()


def close(actual, expected, where: str, rtol: float = 1e-8, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")


@pytest.fixture(scope="module")
def three_process_results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp-losses")
    steps, state = make_steps(), cluster_state()
    torch.save({"steps": steps, "state": state}, tmp_path / "data.pt")
    launch(_worker, str(tmp_path / "init"), str(tmp_path / "data.pt"), str(tmp_path))
    got = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    return got, steps, state


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["global-with-grad", "global"])
def test_on_the_global_batch_every_loss_equals_one_process_on_the_concatenated_batch(three_process_results, mode):
    got, steps, state = three_process_results
    scale = WORLD if MODES[mode][1] else 1  # with the gathered copies' gradients: W x the one-process rows
    for case in cases():
        reference = run_case(case, mode, steps, slice(None), state)
        for rank in range(WORLD):
            mine, rows = got[rank][mode, case], rank_rows(rank)
            for step, (ours, single) in enumerate(zip(mine["steps"], reference["steps"])):
                where = f"{mode} {case} rank {rank} step {step}"
                assert ours["values"].keys() == single["values"].keys(), where
                for name, value in single["values"].items():
                    close(ours["values"][name], value, f"{where} {name}")
                for key, grad in single["input_grads"].items():
                    close(ours["input_grads"][key], scale * grad[rows], f"{where} d/d{key}")
                for name, grad in single["param_grads"].items():
                    close(ours["param_grads"][name], grad, f"{where} d/d{name}")
            for name, buffer in reference["steps"][-1]["buffers"].items():
                ours = mine["steps"][-1]["buffers"][name]
                close(ours, buffer, f"{mode} {case} rank {rank} {name}", rtol=1e-6, atol=1e-7)


def barlow_on_rank(steps: list[dict], rank: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Barlow Twins of rank `rank` written out in one process: each rank's rows standardised on their own, the
    correlation summed over the ranks and divided by the whole batch's rows, the other ranks' terms constants
    (an all_reduce passes no gradient)."""
    step = steps[0]
    leaves = {key: step[key].clone().requires_grad_() for key in ("image", "text")}
    correlation = 0
    for other in range(WORLD):
        a, b = (F.normalize(leaves[key][rank_rows(other)], dim=1) for key in ("image", "text"))
        a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5)
        b = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + 1e-5)
        term = a.T @ b
        correlation = correlation + (term if other == rank else term.detach())
    correlation = correlation / sum(LOCAL_SIZES)
    on = (torch.diagonal(correlation) - 1).pow(2).sum()
    off = (correlation - torch.diag(torch.diagonal(correlation))).pow(2).sum()
    value = on + BarlowTwins().redundancy_weight * off
    value.backward()
    return value.detach(), {key: leaf.grad[rank_rows(rank)] for key, leaf in leaves.items()}


@pytest.mark.slow
def test_on_local_batches_each_rank_computes_its_own_rows_with_itras_shared_statistics(three_process_results):
    got, steps, state = three_process_results
    first = steps[:1]  # after a step, shared statistics differ from a one-process run on one rank's rows
    for case in cases():
        if case in ALWAYS_GLOBAL:
            continue
        for rank in range(WORLD):
            ours, where = got[rank]["local", case]["steps"][0], f"local {case} rank {rank}"
            if case == "BarlowTwins":
                value, grads = barlow_on_rank(steps, rank)
                close(sum(ours["values"].values()), value, where)
                for key, grad in grads.items():
                    close(ours["input_grads"][key], grad, f"{where} d/d{key}")
                continue
            single = run_case(case, "local", first, rank_rows(rank), state)["steps"][0]
            for name, value in single["values"].items():
                close(ours["values"][name], value, f"{where} {name}")
            for key, grad in single["input_grads"].items():
                close(ours["input_grads"][key], grad, f"{where} d/d{key}")
            for name, grad in single["param_grads"].items():
                close(ours["param_grads"][name], grad, f"{where} d/d{name}")
            # the state after the step: every rank's rows (ITRA's all_reduce, SEED's gathered keys), or only the
            # rank's own (CompRess's queue per rank)
            rows = slice(None) if case in GLOBAL_STATISTICS else rank_rows(rank)
            state_reference = run_case(case, "local", first, rows, state)["steps"][0]["buffers"]
            for name, buffer in state_reference.items():
                close(ours["buffers"][name], buffer, f"{where} {name}", rtol=1e-6, atol=1e-7)


# InfoNCE with unequal and empty local batches, with and without --local-loss: per step, the rows of rank 0 and 1
UNEQUAL_STEPS = ((3, 5, 2), (4, 0, 3))  # in the second step rank 1 has no readable sample


MIXUP_LAMS = (0.7, 0.4, 0.9)  # each rank's lam with --mixup-alpha (its rows are paired within its own slice)


def run_infonce(
    local_loss: bool,
    steps: list[dict[str, torch.Tensor]],
    rank: int | None,
    mixed: bool = False,
    with_grad: bool = True,
) -> list[dict]:
    """Per step: the value, the input gradients and the logit-scale gradient, on `rank`'s rows (None: all rows).

    `mixed`: the images were mixed per rank (MIXUP_LAMS); the one-process reference (rank None) scores the
    concatenated batch with soft targets written out here: lam on a row's own pair, 1 - lam on its mirror's
    within its rank's slice."""
    torch.manual_seed(0)
    loss = build_loss("InfoNCE", LossOptions(gather_with_grad=with_grad, local_loss=local_loss), DIM).double()
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


# (local_loss, mixed, --gather-with-grad); open_clip's default gather (no gradient through the other copies) only
# without --local-loss, where its gradient is exact (1/W of one process's after DDP's average)
CASES = ((False, False, True), (True, False, True), (False, True, True), (True, True, True), (False, False, False))


def _infonce_worker(rank: int, init_file: str, data_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        steps = torch.load(data_file, weights_only=False)
        results = {case: run_infonce(case[0], steps, rank, case[1], case[2]) for case in CASES}
        torch.save(results, f"{out_dir}/infonce-rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.mark.slow
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
    for local, mixed, with_grad in CASES:
        single = run_infonce(local, steps, None, mixed)
        for index, (sizes, reference) in enumerate(zip(UNEQUAL_STEPS, single)):
            where = f"local_loss={local} mixed={mixed} with_grad={with_grad} step {index}"
            ranks = [got[rank][local, mixed, with_grad][index] for rank in range(WORLD)]
            # DDP averages the W ranks' gradients: their mean loss is the one-process loss (each rank's own
            # value with the global loss, its share W * sum(own rows) / N with --local-loss)
            torch.testing.assert_close(sum(r["value"] for r in ranks) / WORLD, reference["value"], msg=where)
            torch.testing.assert_close(sum(r["scale"] for r in ranks) / WORLD, reference["scale"], msg=where)
            for rank, mine in enumerate(ranks):
                rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
                scale = WORLD if with_grad else 1  # with it the gather sums the ranks' gradients: W x the rows'
                for key in ("image", "text"):
                    torch.testing.assert_close(mine[key], scale * reference[key][rows], msg=f"{where} rank {rank}")
                if not local:
                    torch.testing.assert_close(mine["value"], reference["value"], msg=where)
