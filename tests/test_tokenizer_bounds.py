"""tokenizer.max_bytes_per_token: a bound that every real text respects (so a prompt refused
by it really was too long), and None for tokenizers that can drop or fold text."""
import numpy as np
import pytest

from paged_jax.tokenizer import max_bytes_per_token


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_tokenizer_files):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(smollm2_tokenizer_files))


def random_texts(seed, n=40):
    rng = np.random.default_rng(seed)
    pieces = ["the", " ", "    ", "\n\n\n", "é", "日本語", "🙂", "\t", "1234567890", "<|im_start|>",
              "aaaaaaaa", "  ", "—", "\u0301", "ﬁ", "x" * 50, " " * 200]
    return ["".join(rng.choice(pieces, int(rng.integers(1, 60)))) for _ in range(n)]


def test_no_text_has_more_bytes_than_its_tokens_can_stand_for(smollm2_tokenizer):
    bound = max_bytes_per_token(smollm2_tokenizer)
    assert bound is not None and bound >= 16
    tightest = 0.0
    for text in random_texts(0):
        num_tokens = len(smollm2_tokenizer.encode(text))
        assert len(text.encode()) <= bound * num_tokens
        tightest = max(tightest, len(text.encode()) / num_tokens)
    assert tightest > 1  # the texts were not trivially short per token


def test_tokenizers_that_drop_or_fold_text_have_no_bound():
    import tokenizers
    import transformers
    from tokenizers import models, normalizers, pre_tokenizers

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3}
    wordpiece = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()  # drops whitespace
    bpe = tokenizers.Tokenizer(models.BPE({"a": 0, "b": 1, "<unk>": 2}, [], unk_token="<unk>",
                                          fuse_unk=True))  # folds unknown text into <unk>
    nfc = tokenizers.Tokenizer(models.BPE({"a": 0}, [], byte_fallback=True))
    nfc.normalizer = normalizers.NFC()  # composes characters: fewer bytes after it
    for tok in (wordpiece, bpe, nfc):
        wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
        assert max_bytes_per_token(wrapped) is None
