import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses import LossOptions, build_loss
from protorkd.losses.base import LossInputs
from protorkd.losses.protoclip import ProtoCLIP
from protorkd.prototypes.clustering import ClusterState


def t64(rows):
    return torch.tensor(rows, dtype=torch.float64)


IMAGE = F.normalize(t64([[1.0, 0.2], [0.1, 1.0], [-0.5, 0.5]]), dim=1)
TEXT = F.normalize(t64([[0.9, 0.4], [0.3, 1.0], [-0.7, 0.2]]), dim=1)
INDICES = torch.tensor([4, 0, 2])  # corpus rows of the batch
PROTO_SCALE = 10.0
INFONCE_SCALE = 20.0

STATE = ClusterState(
    # label tables indexed by corpus row (5 rows; row 1 and 3 are not in the batch)
    image_labels=torch.tensor([1, 0, 0, 1, 1]),
    text_labels=torch.tensor([0, 1, 1, 0, 1]),
    image_centroids=t64([[0.6, 0.6], [-0.4, 0.8]]),
    text_centroids=t64([[0.9, 0.1], [0.2, 0.7]]),
    image_centroids_from_text=t64([[0.7, 0.3], [-0.1, 0.9]]),
    text_centroids_from_image=t64([[0.5, 0.5], [0.0, 0.0]]),  # an empty cluster: zero vector
    external_labels=torch.tensor([1, 1, 0, 0, 1]),
    external_centroids=t64([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
    image_centroids_from_external=t64([[0.3, -0.3], [0.8, 0.4]]),
    text_centroids_from_external=t64([[0.2, 0.2], [-0.6, 0.1]]),
)


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def log_softmax(values):
    top = max(values)
    log_z = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_z for v in values]


def softmax(values):
    return [math.exp(v) for v in log_softmax(values)]


def hand_proto_loss(features, prototypes, teacher_centroids, labels, temperature):
    total = 0.0
    for x, y in zip(features, labels):
        log_probs = log_softmax([PROTO_SCALE * dot(x, p) for p in prototypes])
        if temperature > 0:
            target = softmax([dot(teacher_centroids[y], c) / temperature for c in teacher_centroids])
            total += -sum(t * lp for t, lp in zip(target, log_probs))
        else:
            total += -log_probs[y]
    return total / len(features)


def hand_infonce(a, b, scale):
    total = 0.0
    for rows, cols in ((a, b), (b, a)):
        for i, row in enumerate(rows):
            total += -log_softmax([scale * dot(row, c) for c in cols])[i]
    return total / (2 * len(a))


def make_loss(**kwargs) -> ProtoCLIP:
    loss = ProtoCLIP(**kwargs).double()
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(INFONCE_SCALE))
        loss.logit_scale_proto.fill_(math.log(PROTO_SCALE))
    loss.set_clusters(STATE)
    return loss


def batch(epoch=0, image=IMAGE, text=TEXT):
    return LossInputs(image_features=image, text_features=text, teacher="none", indices=INDICES, epoch=epoch)


def labels_of(table):
    return [int(table[i]) for i in INDICES]


@pytest.mark.parametrize("pbt", [False, True])
@pytest.mark.parametrize("target_temperature", [-1.0, 0.5])
def test_protoclip_equals_hand_computation(pbt, target_temperature):
    assert not distributed.is_initialized()
    loss = make_loss(w_clip=1.0, w_proto=0.7, w_proto_external=0.3, target_temperature=target_temperature, pbt=pbt)
    terms = loss(batch())
    image, text = IMAGE.tolist(), TEXT.tolist()
    s = STATE
    image_prototypes = s.image_centroids_from_text if pbt else s.text_centroids
    text_prototypes = s.text_centroids_from_image if pbt else s.image_centroids
    i2t = hand_proto_loss(
        image, image_prototypes.tolist(), s.text_centroids.tolist(), labels_of(s.text_labels), target_temperature
    )
    t2i = hand_proto_loss(
        text, text_prototypes.tolist(), s.image_centroids.tolist(), labels_of(s.image_labels), target_temperature
    )
    assert terms["infonce_loss"].item() == pytest.approx(hand_infonce(image, text, INFONCE_SCALE), rel=1e-9)
    assert terms["proto_loss"].item() == pytest.approx(0.7 * 0.5 * (i2t + t2i), rel=1e-9)
    if pbt:
        external = labels_of(s.external_labels)
        i2e = hand_proto_loss(image, s.image_centroids_from_external.tolist(), None, external, -1.0)
        t2e = hand_proto_loss(text, s.text_centroids_from_external.tolist(), None, external, -1.0)
        assert terms["proto_external_loss"].item() == pytest.approx(0.3 * 0.5 * (i2e + t2e), rel=1e-9)
    else:  # the external teacher needs back translation
        assert terms["proto_external_loss"].item() == 0.0
    logged = loss.log_values()
    assert 0.0 <= logged["protoclip/acc_img2text"] <= 100.0
    assert logged["protoclip/temperature_proto"] == pytest.approx(1 / PROTO_SCALE)


def test_protoclip_when_features_sit_on_their_prototypes_predicts_every_label():
    # each sample's image feature is its text cluster's (PBT) prototype: the argmax is the label
    loss = make_loss(pbt=True)
    prototypes = F.normalize(STATE.image_centroids_from_text, dim=1)
    image = prototypes[torch.tensor(labels_of(STATE.text_labels))]
    loss(batch(image=image))
    assert loss.log_values()["protoclip/acc_img2text"] == 100.0


def test_protoclip_uses_only_infonce_during_warmup_and_before_the_first_clustering():
    warm = make_loss(w_clip=0.5, infonce_warmup_epoch=2)
    terms = warm(batch(epoch=1))
    assert terms["proto_loss"].item() == 0.0 and terms["proto_external_loss"].item() == 0.0
    assert terms["infonce_loss"].item() == pytest.approx(hand_infonce(IMAGE.tolist(), TEXT.tolist(), 20.0), rel=1e-9)
    assert warm(batch(epoch=2))["proto_loss"].item() > 0
    unclustered = build_loss("ProtoCLIP", LossOptions(), 2).double()
    assert unclustered(batch())["proto_loss"].item() == 0.0


def test_protoclip_ignores_rows_the_clustering_did_not_see():
    loss = make_loss()
    inputs = LossInputs(
        image_features=IMAGE, text_features=TEXT, teacher="none", indices=torch.tensor([4, 0, 99]), epoch=0
    )
    first_two = LossInputs(image_features=IMAGE[:2], text_features=TEXT[:2], teacher="none", indices=INDICES[:2])
    expected = hand_proto_loss(
        IMAGE[:2].tolist(), STATE.text_centroids.tolist(), None, labels_of(STATE.text_labels)[:2], -1.0
    )
    expected_t2i = hand_proto_loss(
        TEXT[:2].tolist(), STATE.image_centroids.tolist(), None, labels_of(STATE.image_labels)[:2], -1.0
    )
    assert loss(inputs)["proto_loss"].item() == pytest.approx(0.5 * (expected + expected_t2i), rel=1e-9)
    assert loss(first_two)["proto_loss"].item() == pytest.approx(0.5 * (expected + expected_t2i), rel=1e-9)


def test_protoclip_cluster_state_round_trips_through_a_state_dict_of_another_shape():
    loss = make_loss(pbt=True)
    restored = ProtoCLIP(pbt=True).double()  # empty cluster buffers
    restored.load_state_dict(loss.state_dict())
    torch.testing.assert_close(restored(batch())["proto_loss"], loss(batch())["proto_loss"])
    assert restored.image_labels.tolist() == STATE.image_labels.tolist()


def test_protoclip_with_pbt_refuses_a_state_without_back_translated_centroids():
    state = ClusterState(STATE.image_labels, STATE.text_labels, STATE.image_centroids, STATE.text_centroids)
    with pytest.raises(ValueError, match="back-translated"):
        ProtoCLIP(pbt=True).set_clusters(state)


def test_protoclip_gradient_reaches_features_and_prototype_temperature_only():
    loss = make_loss(pbt=True, target_temperature=0.5)
    image = IMAGE.clone().requires_grad_()
    text = TEXT.clone().requires_grad_()
    terms = loss(batch(image=image, text=text))
    sum(terms.values()).backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    assert loss.logit_scale_proto.grad.abs() > 0
    assert {name for name, _ in loss.named_parameters()} == {"logit_scale", "logit_scale_proto"}


def test_protoclip_looks_labels_up_by_episode_position_when_the_clustering_is_keyed_so():
    # ProtoCLIP indexes labels by each sample's episodic index: here the batch's three samples are one corpus row
    # drawn three times (positions 4, 0 and 2 of the episode), each with its own labels
    loss = ProtoCLIP(w_proto=1.0, w_proto_external=0.0).double()
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(INFONCE_SCALE))
        loss.logit_scale_proto.fill_(math.log(PROTO_SCALE))
    loss.set_clusters(dataclasses.replace(STATE, keyed_by_position=True))
    inputs = LossInputs(
        image_features=IMAGE, text_features=TEXT, teacher="none", indices=torch.tensor([1, 1, 1]), positions=INDICES
    )
    terms = loss(inputs)
    i2t = hand_proto_loss(
        IMAGE.tolist(), STATE.text_centroids.tolist(), None, labels_of(STATE.text_labels), -1.0
    )  # labels_of reads the tables at INDICES, here the positions
    t2i = hand_proto_loss(TEXT.tolist(), STATE.image_centroids.tolist(), None, labels_of(STATE.image_labels), -1.0)
    assert terms["proto_loss"].item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-9)
    assert loss.label_coverage() == (3, 3)
    without_positions = LossInputs(image_features=IMAGE, text_features=TEXT, teacher="none", indices=INDICES)
    with pytest.raises(ValueError, match="positions"):
        loss(without_positions)


def test_protoclip_counts_the_samples_that_had_a_label():
    loss = make_loss()
    loss(LossInputs(image_features=IMAGE, text_features=TEXT, teacher="none", indices=torch.tensor([4, 0, 99])))
    loss(batch())
    assert loss.label_coverage() == (5, 6)
    assert loss.label_coverage() == (0, 0)  # reset by reading


def test_protoclip_lit_epochs_use_only_infonce():
    # ProtoCLIP: `if args.lit_start_epoch > 0 and epoch >= args.lit_start_epoch - 1: w_clip, w_proto, w_ext = 1, 0, 0`
    loss = make_loss(w_clip=0.5, w_proto=1.0, lit_start_epoch=3)
    before, lit = loss(batch(epoch=1)), loss(batch(epoch=2))
    assert before["proto_loss"].item() > 0
    assert before["infonce_loss"].item() == pytest.approx(0.5 * hand_infonce(IMAGE.tolist(), TEXT.tolist(), 20.0))
    assert lit["proto_loss"].item() == 0.0 and lit["proto_external_loss"].item() == 0.0
    assert lit["infonce_loss"].item() == pytest.approx(hand_infonce(IMAGE.tolist(), TEXT.tolist(), 20.0), rel=1e-9)
    assert loss.label_coverage() == (3, 3)  # only the active epoch looked labels up


def test_switched_off_prototype_terms_stay_connected_to_the_projection_features():
    # DistributedDataParallel needs every parameter used in every step, the projection heads included
    loss = make_loss(infonce_warmup_epoch=1)
    image_proto = F.normalize(t64([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1).requires_grad_()
    text_proto = F.normalize(t64([[0.5, 1.0], [1.0, 0.0], [0.0, 1.0]]), dim=1).requires_grad_()
    proto = {"image_proto_features": image_proto, "text_proto_features": text_proto}
    terms = loss(LossInputs(IMAGE, TEXT, teacher="none", indices=INDICES, epoch=0, **proto))
    assert terms["proto_loss"].item() == 0.0
    terms["proto_loss"].backward()
    assert image_proto.grad is not None and torch.count_nonzero(image_proto.grad) == 0
    assert text_proto.grad is not None
