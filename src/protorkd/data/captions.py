"""The byte limit on captions: a caption is cut before any tokenizer sees it.

A tokenizer given one 100 MB caption takes gigabytes and minutes (the process aborted at 11.6 GB in
issue 25), while every text tower truncates far below a few kilobytes anyway (77-512 tokens of about 4 bytes).
The corpus readers (`data.tsv`, `data.webdataset_corpus`) cut each caption to `--max-caption-bytes` as they read
it and count the cuts in the log.
"""

from __future__ import annotations

DEFAULT_MAX_CAPTION_BYTES = 4096
MAX_CAPTION_BYTES = 1_000_000


def cut_caption(caption: str, max_bytes: int) -> str | None:
    """The caption cut to at most `max_bytes` UTF-8 bytes at a character boundary, or None when it fits."""
    if len(caption) * 4 <= max_bytes:  # a character is at most 4 bytes: fits without encoding it
        return None
    encoded = caption.encode("utf-8", errors="surrogatepass")
    if len(encoded) <= max_bytes:
        return None
    return encoded[:max_bytes].decode("utf-8", errors="ignore")
