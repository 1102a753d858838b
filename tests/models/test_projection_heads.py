"""ProtoCLIP's projection heads (`--add-projection-head`): their shape, their initialisation, where they act,
and that no evaluation ever sees them."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from protorkd.models.build import build_dual_encoder
from protorkd.models.heads import make_projection_head
from protorkd.models.options import ModelOptions

TINY = dict(image_model_builder="custom", image_model="micro-cnn", text_model_builder="custom", text_model="tiny-text")
HEADS = dict(add_projection_head=True, projection_dim=8, projection_hidden_dim=12)


def layer_kinds(head: torch.nn.Module) -> list[tuple]:
    kinds = []
    for module in head:
        if isinstance(module, torch.nn.Linear):
            kinds.append(("Linear", module.in_features, module.out_features))
        elif isinstance(module, torch.nn.BatchNorm1d):
            kinds.append(("BN", module.num_features))
        else:
            kinds.append((type(module).__name__,))
    return kinds


def test_projection_head_is_protoclips_linear_bn_relu_stack():
    # megvii-research/protoclip open_clip/model.py: Linear(embed, hidden)+BN+ReLU, (n-1) x the same on hidden, Linear
    assert layer_kinds(make_projection_head(16, 8, 12, 0)) == [("Linear", 16, 8)]
    assert layer_kinds(make_projection_head(16, 8, 12, 1)) == [
        ("Linear", 16, 12),
        ("BN", 12),
        ("ReLU",),
        ("Linear", 12, 8),
    ]
    assert layer_kinds(make_projection_head(16, 8, 12, 2)) == [
        ("Linear", 16, 12),
        ("BN", 12),
        ("ReLU",),
        ("Linear", 12, 12),
        ("BN", 12),
        ("ReLU",),
        ("Linear", 12, 8),
    ]


def test_the_image_head_starts_as_a_copy_of_the_text_head_but_trains_apart():
    model = build_dual_encoder(ModelOptions(**TINY, **HEADS, teacher="none"))
    image_state, text_state = model.image_projection_head.state_dict(), model.text_projection_head.state_dict()
    assert image_state.keys() == text_state.keys()
    for key, value in text_state.items():
        assert torch.equal(image_state[key], value), key
    assert model.image_projection_head[0].weight is not model.text_projection_head[0].weight
    assert layer_kinds(model.text_projection_head)[0] == ("Linear", model.embed_dim, 12)  # on the joint features


def test_forward_returns_normalised_projections_of_the_unnormalised_joint_features():
    torch.manual_seed(0)
    model = build_dual_encoder(ModelOptions(**TINY, **HEADS, teacher="none", text_head_n_layers=1)).eval()
    images, tokens = torch.randn(4, 3, 32, 32), model.tokenize(["a red circle", "b", "c d", "e"])
    out = model(images=images, tokens=tokens)
    joint_image = model.image_head(model.image_tower(images))  # ProtoCLIP: head(encode_image(x)), before normalising
    joint_text = model.text_head(model.text_tower(tokens))
    torch.testing.assert_close(out.image_proto, F.normalize(model.image_projection_head(joint_image)))
    torch.testing.assert_close(out.text_proto, F.normalize(model.text_projection_head(joint_text)))
    torch.testing.assert_close(out.image, F.normalize(joint_image))
    torch.testing.assert_close(out.image_unnormalized, joint_image)  # what CLIP-KD's projection acts on
    torch.testing.assert_close(out.text_unnormalized, joint_text)
    assert out.image_proto.shape == (4, 8)
    assert torch.allclose(out.text_proto.norm(dim=1), torch.ones(4), atol=1e-6)


def test_heads_change_neither_the_joint_features_nor_what_encode_returns():
    torch.manual_seed(0)
    plain = build_dual_encoder(ModelOptions(**TINY, teacher="none")).eval()
    torch.manual_seed(0)
    with_heads = build_dual_encoder(ModelOptions(**TINY, **HEADS, teacher="none")).eval()
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(with_heads.encode_image(images), plain.encode_image(images))
    torch.testing.assert_close(with_heads.encode_texts(["x", "y z", "w"]), plain.encode_texts(["x", "y z", "w"]))
    state = with_heads.state_dict()
    assert any(key.startswith("image_projection_head.") for key in state)
    assert {k: v for k, v in state.items() if "projection_head" not in k}.keys() == plain.state_dict().keys()


def test_no_evaluation_task_runs_the_projection_heads(tiny_corpus):
    from protorkd.eval.suite import EvalOptions, run_suite

    model = build_dual_encoder(ModelOptions(**TINY, **HEADS, teacher="none")).eval()
    calls = []
    for head in (model.image_projection_head, model.text_projection_head):
        head.register_forward_hook(lambda module, inputs, output: calls.append(module))
    reference = copy.deepcopy(model)
    reference.image_projection_head = reference.text_projection_head = None
    options = EvalOptions(device=torch.device("cpu"), batch_size=16, workers=0)
    metrics = run_suite(model, tiny_corpus / "eval", tasks=["zeroshot", "retrieval", "linear"], options=options).metrics
    expected = run_suite(reference, tiny_corpus / "eval", tasks=["zeroshot", "retrieval", "linear"], options=options)
    assert metrics and calls == []
    assert metrics == expected.metrics  # the same numbers as the same model without heads
