"""LLaVA's conversation templates as named choices (`data.template`, eval's `--conv-mode`).

Each template turns a conversation (alternating human and assistant
messages, the image in the first human one) into the text LLaVA's training
tokenizes, and marks which characters carry the loss; `ConversationCodec`
then tokenizes it as LLaVA does. References, each restated in our own code:

- `plain` (pretraining, LLaVA's `conv_llava_plain` and `preprocess_plain`,
  haotian-liu/LLaVA `llava/conversation.py` lines 94-103 and 291-299,
  `llava/train/train.py` lines 588-607): the first human message is replaced
  by the image alone, the first answer follows it with the separator "\\n";
  no system text, no roles; the loss covers everything after the image.
- `vicuna_v1` (LLaVA-1.5's fine-tuning and its eval scripts'
  `--conv-mode vicuna_v1`; `conv_vicuna_v1`, `SeparatorStyle.TWO`,
  conversation.py lines 54-63 and 242-251, `preprocess_v1` train.py lines
  414-497): "{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ...".
  The loss covers each answer and its "</s>".
- `llama3` (the official Skip-Vision code's `--version llama3`:
  zwl666666/Skip-Vision `llava/conversation.py` lines 559-569 and 1988-2001,
  `preprocess_llama3` in `llava/train/train.py` lines 631-712):
  "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>"
  then "<|start_header_id|>{role}<|end_header_id|>\\n\\n{message.strip()}<|eot_id|>"
  per message. The loss covers each answer and its "<|eot_id|>". The text
  starts with "<|begin_of_text|>" and LLaMA-3's tokenizer adds its own, so
  the ids start with two: the official code does the same (kept as it is).
- `llama3_plain` (the official code's `--version plain` and
  `llama3-plain`: its own `plain`, conversation.py lines 1124-1134, whose
  `sep` is " " where LLaVA's is "\\n"; the same `preprocess_plain`).

Where the image goes: LLaVA moves the `<image>` tag to the start of the
first human message, "<image>\\n" + the rest stripped
(`preprocess_multimodal`, train.py lines 308-329); so the image always
follows the same text and its offset is static.

Which tokens carry the loss: LLaVA computes it from token counts of each
round tokenized alone (`cur_len`, `instruction_len - 2`, a tokenizer-version
correction), which holds for LLaMA's tokenizers and for no other. Here a token
carries the loss when its characters overlap an answer or the stop string
after it (the tokenizer's offsets): the same tokens where LLaVA's counting
holds (tests/test_templates.py runs LLaVA's own `preprocess_plain` and
`preprocess_v1` on a LLaMA-style BPE tokenizer), and right for any tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

IMAGE_TAG = "<image>"


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A conversation as text (one `<image>` tag) and the character spans
    [start, end) that carry the loss."""

    text: str
    learned: tuple[tuple[int, int], ...] = ()


class _Builder:
    """Appends text, remembering which spans are learned."""

    def __init__(self):
        self.parts: list[str] = []
        self.length = 0
        self.learned: list[tuple[int, int]] = []

    def add(self, text: str, learned: bool = False) -> None:
        if learned and text:
            self.learned.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def rendered(self) -> Rendered:
        return Rendered("".join(self.parts), tuple(self.learned))


def image_first(message: str) -> str:
    """LLaVA's `preprocess_multimodal`: the tag moved to the front, "<image>\\n" + the rest stripped."""
    return (IMAGE_TAG + "\n" + message.replace(IMAGE_TAG, "").strip()).strip()


# transformers chat templates: messages whose content is a list of
# {"type": "image"} and {"type": "text", "text": ...} parts (LlavaProcessor's).
_JINJA_CONTENT = (
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
)


@dataclasses.dataclass(frozen=True)
class PlainTemplate:
    """LLaVA's pretraining format: the image, then the caption and `sep`."""

    name: str
    sep: str
    stop_strings: tuple[str, ...]
    system: str = ""

    def render(self, messages: Sequence[str]) -> Rendered:
        """A training conversation, one human/gpt pair (`preprocess_plain`
        asserts it): the human message becomes the image alone."""
        if len(messages) != 2:
            raise ValueError(f"the {self.name} template takes one human/gpt pair, not {len(messages) // 2}")
        out = _Builder()
        out.add(IMAGE_TAG)
        out.add(messages[1] + self.sep, learned=True)
        return out.rendered()

    def prompt(self, question: str) -> str:
        """LLaVA's PLAIN `get_prompt` for a question and an empty answer: "<image>\\n{q}" + sep."""
        return image_first(question) + self.sep

    def jinja(self) -> str:
        """`prompt` as a transformers chat template (an exported run's processor)."""
        return (
            "{% for message in messages %}{% if message['role'] == 'user' %}"
            f"{_JINJA_CONTENT}{{{{ {self.sep!r} }}}}{{% endif %}}{{% endfor %}}"
        )


class _ChatTemplate:
    """A template whose training text and generation prompt come from one
    `_render`: the prompt is a conversation whose answer is still empty."""

    def render(self, messages: Sequence[str]) -> Rendered:
        return self._render(messages)

    def prompt(self, question: str) -> str:
        return self._render([question, None]).text


@dataclasses.dataclass(frozen=True)
class RolesTemplate(_ChatTemplate):
    """LLaVA's `SeparatorStyle.TWO`: "{system}{sep}{role}: {message}{sep or sep2}...";
    an empty last message renders "{role}:" (the generation prompt)."""

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str
    stop_strings: tuple[str, ...]

    def _render(self, messages: Sequence[str | None]) -> Rendered:
        out = _Builder()
        out.add(self.system + self.sep)
        for i, message in enumerate(messages):
            role = self.roles[i % 2]
            if message is None:
                out.add(role + ":")
                continue
            # The space after the colon is learned with an answer: a LLaMA
            # tokenizer makes it the answer's first token ("▁" or "▁word"), as
            # preprocess_v1's `instruction_len - 2` counts it.
            out.add(role + ":")
            answer = i % 2 == 1
            out.add(" " + (image_first(message) if i == 0 else message), learned=answer)
            out.add(self.sep2 if answer else self.sep, learned=answer)
        return out.rendered()

    def jinja(self) -> str:
        """The same text as a transformers chat template (an exported run's processor)."""
        user, assistant = self.roles
        return (
            f"{{{{ {self.system + self.sep!r} }}}}{{% for message in messages %}}"
            f"{{% if message['role'] == 'user' %}}{user}: {_JINJA_CONTENT}{{{{ {self.sep!r} }}}}"
            f"{{% else %}}{assistant}: {_JINJA_CONTENT}{{{{ {self.sep2!r} }}}}{{% endif %}}{{% endfor %}}"
            f"{{% if add_generation_prompt %}}{assistant}:{{% endif %}}"
        )


@dataclasses.dataclass(frozen=True)
class Llama3Template(_ChatTemplate):
    """The official Skip-Vision code's LLaMA-3 format (module docstring)."""

    name: str
    system: str
    roles: tuple[str, str] = ("user", "assistant")
    stop_strings: tuple[str, ...] = ("<|eot_id|>", "<|end_of_text|>")

    def _render(self, messages: Sequence[str | None]) -> Rendered:
        out = _Builder()
        out.add("<|begin_of_text|>")
        if self.system:
            out.add(f"<|start_header_id|>system<|end_header_id|>\n\n{self.system}<|eot_id|>")
        for i, message in enumerate(messages):
            out.add(f"<|start_header_id|>{self.roles[i % 2]}<|end_header_id|>\n\n")
            if message is None:
                continue
            answer = i % 2 == 1
            out.add((image_first(message) if i == 0 else message).strip(), learned=answer)
            out.add("<|eot_id|>", learned=answer)
        return out.rendered()

    def jinja(self) -> str:
        """The same text as a transformers chat template (an exported run's processor)."""
        header = "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
        system = f"<|start_header_id|>system<|end_header_id|>\n\n{self.system}<|eot_id|>" if self.system else ""
        return (
            f"<|begin_of_text|>{system}{{% for message in messages %}}{header}"
            f"{{% filter trim %}}{_JINJA_CONTENT}{{% endfilter %}}<|eot_id|>{{% endfor %}}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        )


VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA3_SYSTEM = "You are a helpful and honest multimodal assistant."

DEFAULT_TEMPLATE = "vicuna_v1"
TEMPLATES = {
    "plain": PlainTemplate("plain", sep="\n", stop_strings=("\n", "</s>")),
    "vicuna_v1": RolesTemplate(
        "vicuna_v1", VICUNA_V1_SYSTEM, ("USER", "ASSISTANT"), sep=" ", sep2="</s>", stop_strings=("</s>",)
    ),
    "llama3": Llama3Template("llama3", LLAMA3_SYSTEM),
    "llama3_plain": PlainTemplate("llama3_plain", sep=" ", stop_strings=("<|eot_id|>", "<|end_of_text|>")),
}


def template_named(name: str):
    if name not in TEMPLATES:
        raise ValueError(f"data.template: unknown {name!r}, expected one of {tuple(TEMPLATES)}")
    return TEMPLATES[name]


class ConversationCodec:
    """A tokenizer (Hugging Face `tokenizers`, a tokenizer.json) and a template:
    conversations to training ids and loss masks, questions to prompt ids,
    answer ids to text.

    Tokenized as LLaVA's `tokenizer_image_token` (llava/mm_utils.py lines
    185-204): the text before and after the image tag are tokenized apart,
    each with the tokenizer's special tokens; where the first starts with the
    tokenizer's BOS, every piece loses its first token and one BOS leads. The
    ids before the image are the prefix (`image_offset` of them), the same for
    every conversation of a template."""

    def __init__(self, tokenizer, template):
        self.tokenizer, self.template = tokenizer, template
        probe = tokenizer.encode("")
        self.bos_id = probe.ids[0] if probe.ids else None
        self.prefix_ids, _ = self._split(template.prompt("x"))[:2]
        stops = [tokenizer.token_to_id(s) for s in template.stop_strings]
        self.stop_ids = tuple(s for s in stops if s is not None)
        if not self.stop_ids:
            raise ValueError(
                f"data.template: {template.name} stops at {' or '.join(map(repr, template.stop_strings))}, "
                "which the tokenizer has no token for"
            )
        pad = next((tokenizer.token_to_id(t) for t in ("<pad>", "<unk>") if tokenizer.token_to_id(t) is not None), 0)
        self.pad_id = pad
        self.vocab_size = tokenizer.get_vocab_size()

    @property
    def image_offset(self) -> int:
        return len(self.prefix_ids)

    def _split(self, text: str) -> tuple[list[int], list[int], list[tuple[int, int]], int]:
        """(ids before the image, ids after it, their character offsets, where the text after it starts)."""
        if text.count(IMAGE_TAG) != 1:
            raise ValueError(f"a conversation must hold exactly one {IMAGE_TAG} tag")
        before, after = text.split(IMAGE_TAG)
        head, tail = self.tokenizer.encode(before), self.tokenizer.encode(after)
        strip = 1 if head.ids and head.ids[0] == self.bos_id and self.bos_id is not None else 0
        return list(head.ids), list(tail.ids[strip:]), list(tail.offsets[strip:]), len(before) + len(IMAGE_TAG)

    def example(self, messages: Sequence[str]) -> tuple[list[int], list[bool]]:
        """Training ids (prefix included) and their loss mask."""
        rendered = self.template.render(messages)
        prefix, ids, offsets, start = self._split(rendered.text)
        if prefix != self.prefix_ids:
            raise ValueError("the text before the image differs from the template's")
        spans = np.array(rendered.learned, np.int64).reshape(-1, 2) - start
        mask = [bool(((a < spans[:, 1]) & (b > spans[:, 0]) & (b > a)).any()) for a, b in offsets]
        return prefix + ids, [False] * len(prefix) + mask

    def prompt_ids(self, question: str) -> list[int]:
        """Ids of a one-question prompt ending where the answer starts (for generation)."""
        prefix, ids, _, _ = self._split(self.template.prompt(question))
        return prefix + ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.stop_ids])
