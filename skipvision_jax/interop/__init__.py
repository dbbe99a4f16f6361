"""Hugging Face interop: LLaVA checkpoints, tokenizer, chat template and image processor."""
