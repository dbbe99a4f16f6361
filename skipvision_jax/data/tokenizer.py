"""Word-level tokenizer of the embedded task (its vocabulary is closed)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


class WordTokenizer:
    def __init__(self, words: Sequence[str]):
        self.vocab = [PAD, BOS, EOS, *words]
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("tokenizer words must be distinct")
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[w] for w in text.split()]
        except KeyError as err:
            raise ValueError(f"word {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        words = []
        for i in np.asarray(ids).tolist():
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                words.append(self.vocab[i])
        return " ".join(words)
