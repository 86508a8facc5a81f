"""A byte-level BPE tokenizer trained in-process, so nothing is downloaded.

Byte-level means any text (real HellaSwag, DialogSum, users' data) tokenizes; the vocabulary
is shared by every model version built from it.
"""

from __future__ import annotations

from typing import Iterable

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, individual_digits: bool = False):
    """Train the tokenizer; `individual_digits` keeps every digit its own token, as
    arithmetic-friendly tokenizers (Llama's, for one) do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if individual_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL)


SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog. A man is sitting on a roof.",
    "Question: How many apples are left? Answer: 12 apples. #### 12",
    "She sells 16 - 3 - 4 = 9 eggs a day and makes 9 * 2 = $18.",
    "#Person1#: Hello, how are you? #Person2#: Fine, thanks. Summary: they greet each other.",
    "To open a jar, twist the lid counterclockwise while holding the base firmly.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000",
] * 20
