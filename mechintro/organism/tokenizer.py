"""A word-level tokenizer with Gemma-style turn markers.

Text is split into words, newlines and single punctuation marks. A word that follows a space carries the
SentencePiece-style marker ``▁`` (so ``"about Bread"`` is ``["about", "▁Bread"]``), which lets the decoder
restore spacing exactly and gives Yes/No the same leading-space variants as Gemma's real tokenizer.

The result is a ``transformers.PreTrainedTokenizerFast`` with a Gemma-3-style chat template, so
``apply_chat_template`` and ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` work as for a real Gemma.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPACE = "▁"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")

# Gemma 3's chat template, reduced to what a text-only model needs: the system prompt is folded into the first
# user turn, "assistant" is rendered as "model", and the generation prompt opens a model turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_PUNCT = r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]"""


def _pre_tokenizer(prepend: str = "never") -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            # newlines are tokens of their own
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            # spaces become a "▁" prefix on the following word; at the start of a piece only with "always"
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=prepend, split=True),
            # every punctuation mark is its own token
            pre_tokenizers.Split(Regex(_PUNCT), behavior="isolated"),
        ]
    )


def pieces(text: str, *, prepend: str = "never") -> list[str]:
    """The word pieces ``text`` splits into (before vocabulary lookup)."""
    return [p for p, _ in _pre_tokenizer(prepend).pre_tokenize_str(text)]


def vocabulary(texts: Iterable[str], *, extra_words: Iterable[str] = (), prepend: str = "never") -> list[str]:
    """Every piece seen in ``texts`` plus ``extra_words`` in both the bare and ``▁``-prefixed form.

    The order is deterministic: special tokens, then pieces sorted.
    """
    seen: set[str] = set()
    for text in texts:
        seen.update(pieces(text, prepend=prepend))
    for word in extra_words:
        seen.update({word, SPACE + word})
    seen.difference_update(SPECIAL_TOKENS)
    seen.discard("")
    return list(SPECIAL_TOKENS) + sorted(seen)


def build_tokenizer(vocab: list[str], *, prepend: str = "never") -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` over ``vocab`` (special tokens first), with the Gemma-style chat
    template.

    ``prepend="never"`` is Gemma-like (a word after a newline has no ``▁``); ``"always"`` gives every word the
    marker, so each word is one token wherever it stands (the organism's choice: a concept that opens an
    answer
    and one inside a sentence are the same token).
    """
    if list(vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
        raise ValueError(f"vocab must start with the special tokens {SPECIAL_TOKENS}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocab has duplicate entries")
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = _pre_tokenizer(prepend)
    core.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme=prepend, split=True)
    return gemma_style(core)


def gemma_style(core: Tokenizer) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` around ``core`` with Gemma's special tokens, left padding and the
    Gemma-3-style chat template."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
