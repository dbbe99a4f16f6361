"""Data: the embedded synthetic task, LLaVA-format sources, tokenizers, grain pipelines."""
