"""A trained model out of protorkd: open_clip's hub layout (`open_clip_format`), ONNX graphs (`onnx_format`),
each with a Hugging Face model card (`model_card`)."""
