"""A byte-level BPE tokenizer trained on local text, for a public model made from scratch.

FlexOlmo starts from a public model that comes with its tokenizer; where none is at hand (the
demo, the tests, :func:`flexmoe.training.pretrain.pretrain`), this trains one with the
``tokenizers`` library and wraps it as a ``transformers`` tokenizer, so every later step
(packing, export) treats it like any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    special_tokens: Sequence[str] = ("<pad>", "<bos>", "<eos>"),
):
    """Train a byte-level BPE tokenizer on ``texts`` as a ``transformers`` tokenizer.

    ``special_tokens`` are pad, bos, eos (ids 0, 1, 2 in that order), then any further
    special tokens. Byte-level means every string encodes, so ``vocab_size`` must leave room
    for the 256 byte symbols and the special tokens. No special token is added on encoding.
    """
    special_tokens = list(special_tokens)
    if len(special_tokens) < 3 or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens must be distinct pad, bos, eos (then any others), got {special_tokens}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for the {len(alphabet)} byte symbols and "
            f"{len(special_tokens)} special tokens; use at least {len(alphabet) + len(special_tokens)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    pad, bos, eos, *extra = special_tokens
    more = {"extra_special_tokens": extra} if extra else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos, **more)
