"""The image tower and head of a dual encoder as an open_clip vision config and open_clip's `visual.*` weights.

* a timm backbone (`--image-model-builder timm`, the built-in `tiny-vit`) -> open_clip's `TimmModel`, the
  head as its projection (`timm_proj`: none, linear with bias, or mlp);
* the built-in `tiny-cnn` / `micro-cnn` (`TinyCNN`) -> a timm ConvNeXt configuration computing the same
  function in eval mode (`tiny_cnn_as_convnext`), then as a timm backbone;
* an open_clip visual (`--image-model-builder open_clip`) -> its own config, a linear head folded into its
  output projection.

Anything else is `NotExpressible`: one line naming the tower and the format that works (onnx).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from protorkd.errors import UsageError
from protorkd.models.image_towers import ImageTower, TimmForm
from protorkd.models.tiny import TinyCNN

ONNX_INSTEAD = "export it with --format onnx, which takes any model"
TIMM_FOLDER = "timm"  # the export's subfolder holding a timm architecture's config.json (timm's hub layout)
CONVNEXT = "convnext_atto"  # timm's ConvNeXt entry point whose arguments any ConvNeXt configuration overrides
CONVNEXT_STAGES, CONVNEXT_MLP_RATIO = 4, 4  # fixed by timm's ConvNeXt


class NotExpressible(UsageError):
    """A tower or head open_clip cannot express (the message names it and the format that works)."""


@dataclass
class VisionPart:
    """open_clip's `vision_cfg`, the `visual.*` weights, top-level model_cfg keys, extra files to write."""

    vision_cfg: dict[str, Any]
    state: dict[str, torch.Tensor]
    model_cfg: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # path in the export -> text
    notes: list[str] = field(default_factory=list)  # how the tower is expressed, for the model card


def head_layers(head: nn.Module) -> list[nn.Module]:
    """The head as a list of modules: [] (identity), [Linear], or [Linear, GELU, ..., Linear]."""
    if isinstance(head, nn.Identity):
        return []
    if isinstance(head, nn.Linear):
        return [head]
    return list(head)


def linear_head(head: nn.Module, side: str, tower: str) -> nn.Linear | None:
    """A head that an open_clip tower's projection can take in: identity (None) or one Linear; an MLP is refused."""
    layers = head_layers(head)
    if len(layers) > 1:
        raise NotExpressible(f"an MLP {side} head on the open_clip tower {tower} has no open_clip form; {ONNX_INSTEAD}")
    return layers[0] if layers else None


def model_extras(source_cfg: dict[str, Any]) -> dict[str, Any]:
    """An open_clip config's model-level keys (quick_gelu, custom_text, init_logit_bias, ...)."""
    return {k: v for k, v in source_cfg.items() if k not in ("embed_dim", "vision_cfg", "text_cfg")}


# ----------------------------------------------------------------------------------------------- tiny-cnn


def _identity_batchnorm(prefix: str, channels: int, out: dict[str, torch.Tensor]) -> None:
    """A BatchNorm2d that is the identity in eval mode: (x - 0) / sqrt((1 - eps) + eps) * 1 + 0."""
    out[f"{prefix}.weight"] = torch.ones(channels)
    out[f"{prefix}.bias"] = torch.zeros(channels)
    out[f"{prefix}.running_mean"] = torch.zeros(channels)
    out[f"{prefix}.running_var"] = torch.full((channels,), 1.0 - 1e-5)
    out[f"{prefix}.num_batches_tracked"] = torch.tensor(0)


def tiny_cnn_as_convnext(model: TinyCNN, image_size: int) -> tuple[TimmForm, dict[str, torch.Tensor]]:
    """timm's ConvNeXt arguments and weights computing what `model` computes in eval mode (to float rounding).

    TinyCNN: patchify stem (conv 4x4/4 + BN), stages of blocks [depthwise 3x3 conv (no bias) -> BN -> 1x1 conv
    (2x) -> GELU -> 1x1 conv, + input], between stages conv 2x2/2 -> BN, then the spatial mean. ConvNeXt with
    BatchNorm, 1x1-conv MLPs, kernel 3 and layer scale 1 has the same stem and blocks, with these differences,
    each exact in eval mode: its depthwise conv has a bias (set to 0); its MLP is 4x wide (the extra hidden
    units get zero weights, GELU(0) = 0); its stage downsample is BN -> conv (the BN set to the identity, our
    BN folded into the conv); its head applies a BN after pooling (the identity); and it always has 4 stages
    (each missing stage is a 2x2/2 conv with weights 1/4 on the diagonal: a 2x2 average, whose global mean
    is the global mean of its input when the feature map is even-sized).
    """
    widths, depths, stages = _tiny_cnn_shape(model)
    spatial = image_size // 4 // 2 ** (len(widths) - 1)
    if spatial % 2 ** (CONVNEXT_STAGES - len(widths)):
        raise NotExpressible(
            f"tiny-cnn at --image-size {image_size}: its last feature map ({spatial}x{spatial}) cannot be averaged "
            f"by ConvNeXt's remaining stride-2 stages; {ONNX_INSTEAD}"
        )
    dims = [*widths, *[widths[-1]] * (CONVNEXT_STAGES - len(widths))]
    state: dict[str, torch.Tensor] = {}
    stem_conv, stem_norm = stages[0]
    state["stem.0.weight"], state["stem.0.bias"] = stem_conv.weight, stem_conv.bias
    state.update({f"stem.1.{k}": v for k, v in stem_norm.state_dict().items()})
    for index, (downsample, blocks) in enumerate(stages[1:]):
        if downsample is not None:
            conv, norm = downsample
            _identity_batchnorm(f"stages.{index}.downsample.0", conv.in_channels, state)
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            state[f"stages.{index}.downsample.1.weight"] = conv.weight * scale[:, None, None, None]
            state[f"stages.{index}.downsample.1.bias"] = (conv.bias - norm.running_mean) * scale + norm.bias
        for number, block in enumerate(blocks):
            prefix, width = f"stages.{index}.blocks.{number}", block.depthwise.in_channels
            first, second = block.pointwise[0], block.pointwise[2]
            hidden = first.out_channels
            fc1_weight = torch.zeros(CONVNEXT_MLP_RATIO * width, width, 1, 1)
            fc1_bias = torch.zeros(CONVNEXT_MLP_RATIO * width)
            fc2_weight = torch.zeros(width, CONVNEXT_MLP_RATIO * width, 1, 1)
            fc1_weight[:hidden], fc1_bias[:hidden], fc2_weight[:, :hidden] = first.weight, first.bias, second.weight
            state.update(
                {
                    f"{prefix}.gamma": torch.ones(width),
                    f"{prefix}.conv_dw.weight": block.depthwise.weight,
                    f"{prefix}.conv_dw.bias": torch.zeros(width),
                    f"{prefix}.mlp.fc1.weight": fc1_weight,
                    f"{prefix}.mlp.fc1.bias": fc1_bias,
                    f"{prefix}.mlp.fc2.weight": fc2_weight,
                    f"{prefix}.mlp.fc2.bias": second.bias,
                    **{f"{prefix}.norm.{k}": v for k, v in block.norm.state_dict().items()},
                }
            )
    for index in range(len(widths), CONVNEXT_STAGES):  # 2x2 averages
        channels = dims[index]
        _identity_batchnorm(f"stages.{index}.downsample.0", channels, state)
        average = torch.zeros(channels, channels, 2, 2)
        average[range(channels), range(channels)] = 0.25
        state[f"stages.{index}.downsample.1.weight"] = average
        state[f"stages.{index}.downsample.1.bias"] = torch.zeros(channels)
    _identity_batchnorm("head.norm", dims[-1], state)
    args = {
        "depths": [*depths, *[0] * (CONVNEXT_STAGES - len(widths))],
        "dims": dims,
        "kernel_sizes": 3,
        "ls_init_value": 1.0,
        "conv_mlp": True,
        "conv_bias": True,
        "norm_layer": "batchnorm2d",
    }
    return TimmForm(CONVNEXT, args), {k: v.detach().clone() for k, v in state.items()}


def _tiny_cnn_shape(model: TinyCNN) -> tuple[list[int], list[int], list]:
    """(widths, depths, [(stem conv, stem BN), (downsample or None, [blocks]) per stage]) of a TinyCNN."""
    layers = list(model.features)
    stages: list = [(layers[0], layers[1])]
    widths, depths, position = [], [], 2
    while position < len(layers):
        downsample = None
        if isinstance(layers[position], nn.Conv2d):
            downsample, position = (layers[position], layers[position + 1]), position + 2
        blocks = []
        while position < len(layers) and not isinstance(layers[position], nn.Conv2d):
            blocks.append(layers[position])
            position += 1
        stages.append((downsample, blocks))
        widths.append(blocks[0].depthwise.in_channels if blocks else downsample[0].out_channels)
        depths.append(len(blocks))
    return widths, depths, stages


# ----------------------------------------------------------------------------------------------- timm towers


def _default_pool(trunk: nn.Module) -> str:
    """The global pooling a timm model was created with ('avg', 'token', ...)."""
    pool = getattr(trunk, "global_pool", None)
    if pool is None and hasattr(trunk, "head"):
        pool = getattr(trunk.head, "global_pool", None)
    if isinstance(pool, str):
        return pool
    pool_type = getattr(pool, "pool_type", None)
    if isinstance(pool_type, str) and pool_type:
        return pool_type
    raise NotExpressible(f"cannot tell the global pooling of timm model {type(trunk).__name__}; {ONNX_INSTEAD}")


def timm_vision(
    form: TimmForm, trunk_state: dict[str, torch.Tensor], pool: str, image_size: int, head: nn.Module, *, embed_dim: int
) -> VisionPart:
    """open_clip's TimmModel over a timm backbone, with the image head as its projection."""
    layers = head_layers(head)
    state = {f"visual.trunk.{k}": v for k, v in trunk_state.items()}
    if not layers:
        proj = "none"
    elif len(layers) == 1:
        proj = "linear"
        state["visual.head.proj.weight"], state["visual.head.proj.bias"] = layers[0].weight, layers[0].bias
    elif len(layers) == 3 and layers[0].out_features == 2 * embed_dim and isinstance(layers[1], nn.GELU):
        proj = "mlp"  # timm's Mlp: fc1 (2 x embed_dim) -> GELU -> fc2, both with biases
        for name, layer in (("fc1", layers[0]), ("fc2", layers[2])):
            state[f"visual.head.mlp.{name}.weight"], state[f"visual.head.mlp.{name}.bias"] = layer.weight, layer.bias
    else:
        raise NotExpressible(
            f"the image head ({len(layers) // 2 + 1} layers, hidden {layers[0].out_features}) has no open_clip form "
            f"(a timm tower's projection is linear, or an MLP of hidden width 2 x {embed_dim}); {ONNX_INSTEAD}"
        )
    files = {}
    name = form.architecture
    if form.model_args:  # a configuration timm's registry does not hold: a timm config.json in the export
        timm_config = {
            "architecture": form.architecture,
            "num_classes": 0,
            "model_args": form.model_args,
            "pretrained_cfg": {"input_size": [3, image_size, image_size]},  # timm's hub layout
        }
        files[f"{TIMM_FOLDER}/config.json"] = json.dumps(timm_config, indent=2)
        name = None  # the export folder's path, filled in by the writer
    vision_cfg = {
        "timm_model_name": name,
        "timm_model_pretrained": False,
        "timm_pool": pool,
        "timm_proj": proj,
        "timm_proj_bias": True,
        "image_size": image_size,
    }
    return VisionPart(vision_cfg, state, files=files)


def custom_vision(tower: ImageTower, head: nn.Module, *, embed_dim: int) -> VisionPart:
    size = tower.preprocess.image_size
    backbone = tower.backbone
    if isinstance(backbone, TinyCNN):
        form, state = tiny_cnn_as_convnext(backbone, size)
        part = timm_vision(form, state, "avg", size, head, embed_dim=embed_dim)
        part.notes.append(
            f"The image tower {tower.name} is written as a configuration of timm's ConvNeXt (`{TIMM_FOLDER}/"
            "config.json`) that computes the same function in eval mode: BatchNorm layers, 1x1-conv MLPs with the "
            "extra hidden units zeroed, each stage's BatchNorm folded into its downsampling conv, and the missing "
            "fourth stage a 2x2 average."
        )
        return part
    if tower.timm_form is not None:
        return timm_vision(tower.timm_form, backbone.state_dict(), _default_pool(backbone), size, head,
                           embed_dim=embed_dim)  # fmt: skip
    raise NotExpressible(f"the image tower {tower.name} has no open_clip or timm form; {ONNX_INSTEAD}")


# ----------------------------------------------------------------------------------------------- open_clip towers


def open_clip_vision(tower: ImageTower, head: nn.Module, source_cfg: dict[str, Any], *, embed_dim: int) -> VisionPart:
    """An open_clip visual from the open_clip config it was built from, a linear head folded into it."""
    visual = tower.backbone
    state = {f"visual.{k}": v.detach().clone() for k, v in visual.state_dict().items()}
    vision_cfg = dict(source_cfg["vision_cfg"])
    linear, notes = linear_head(head, "image", tower.name), []
    if linear is not None:
        _fold_linear_head(visual, state, vision_cfg, linear, tower.name)
        notes.append(f"The linear image head is folded into the output projection of {tower.name}.")
    return VisionPart(vision_cfg, state, model_cfg=model_extras(source_cfg), notes=notes)


def _fold_linear_head(visual: nn.Module, state: dict, vision_cfg: dict, linear: nn.Linear, name: str) -> None:
    """z = W v + b after the visual's own output projection, folded into that projection.

    ModifiedResNet (`attnpool.c_proj`, a Linear) and a timm tower's linear projection take W and b exactly. A
    VisionTransformer's projection `proj` has no bias: W goes into it (proj W^T), and b into the bias of the
    LayerNorm before it (`ln_post`): (g n + beta + d) P = (g n + beta) P + b needs d P = b, solved in float64.
    That is exact only in exact arithmetic: |d| grows with the condition number of P (W's product with the ViT's
    projection; 1.6e6 for a tiny random ViT, |d| 8,238 for |b| 0.6), and float32 then loses the bias's precision.
    The export's own check measures what is left and refuses the export above 1e-5 (ONNX takes any model).
    """
    weight, bias = linear.weight.detach().double(), linear.bias.detach().double()
    if "visual.attnpool.c_proj.weight" in state:
        prefix = "visual.attnpool.c_proj"
    elif "visual.head.proj.weight" in state:
        prefix = "visual.head.proj"
        vision_cfg["timm_proj_bias"] = True
        state.setdefault(f"{prefix}.bias", torch.zeros(state[f"{prefix}.weight"].shape[0]))
    elif "visual.proj" in state and "visual.ln_post.bias" in state and getattr(visual, "attn_pool", None) is None:
        projection = state["visual.proj"].double() @ weight.T  # [width, D]
        delta = torch.linalg.lstsq(projection.T, bias.unsqueeze(1)).solution.squeeze(1)  # P^T d = b
        state["visual.proj"] = projection.float()
        state["visual.ln_post.bias"] = (state["visual.ln_post.bias"].double() + delta).float()
        return
    else:
        raise NotExpressible(f"a linear image head on the open_clip tower {name} has no open_clip form; {ONNX_INSTEAD}")
    inner_weight, inner_bias = state[f"{prefix}.weight"].double(), state[f"{prefix}.bias"].double()
    state[f"{prefix}.weight"] = (weight @ inner_weight).float()
    state[f"{prefix}.bias"] = (weight @ inner_bias + bias).float()
