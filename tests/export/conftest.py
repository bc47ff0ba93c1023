"""Fixtures for the export tests: a tiny byte-level BPE tokenizer (trained here, no download)."""
from __future__ import annotations

import pytest

VOCAB = 320


def bpe_tokenizer(path) -> str:
    """A byte-level BPE tokenizer of ``VOCAB`` ids (GPT-2 style, like SmolLM2's) saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    text = ("the quick brown fox jumps over the lazy dog. quantization keeps the weights small; "
            "perplexity measures the loss. ") * 40
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 3, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def bpe(bpe_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(bpe_dir)
