"""ProtoRKD: relational and prototypical knowledge distillation for compact vision-language encoders."""

__version__ = "0.1.0"
