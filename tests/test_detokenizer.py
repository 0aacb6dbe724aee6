"""Incremental detokenization (paged_jax/detokenizer.py) against the tokenizer's whole decode,
on SmolLM2's byte-level BPE tokenizer: random token ids and text full of multi-byte characters
split across tokens."""
from __future__ import annotations

import numpy as np
import pytest

from paged_jax.detokenizer import output_text, supports
from paged_jax.request import Request
from paged_jax.sampling_params import SamplingParams
from paged_jax.stop import StopChecker

TEXT = ("Héllo wörld — 你好, 🤖 emojis! <|im_end|> and  spaces\n\tdone. Ünïcödé ✓ "
        "日本語のテキスト, ελληνικά, עברית, 🎉🎉 end")


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_files):
    from paged_jax.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_tokenizer_files)


def _outputs(tok):
    rng = np.random.default_rng(0)
    ids = tok.encode(TEXT, add_special_tokens=False)
    special = sorted(tok.added_tokens_decoder)[:3]
    return [ids, rng.integers(0, len(tok), 300).tolist(),
            special + ids + special + rng.integers(0, len(tok), 50).tolist() + ids]


@pytest.mark.parametrize("skip", [True, False])
def test_the_stream_is_the_whole_decode_less_a_held_tail(tok, skip):
    assert supports(tok, skip, True)
    for ids in _outputs(tok):
        req = Request("r", [1], SamplingParams(skip_special_tokens=skip), 10**6, seed=0)
        held_steps = 0
        for i, token in enumerate(ids):
            req.output_token_ids.append(token)
            if i % 3 == 2:  # (several tokens a call too, as a step with drafts appends)
                continue
            full = tok.decode(req.output_token_ids, skip_special_tokens=skip)
            text = output_text(req, tok)
            assert full.startswith(text), (i, full[-20:], text[-20:])
            if req.text_stream.held:
                held_steps += 1
                assert output_text(req, tok, complete=True) is None
            else:
                assert text == full and output_text(req, tok, complete=True) == full
        full = tok.decode(ids, skip_special_tokens=skip)
        assert full.startswith(output_text(req, tok))
    assert held_steps > 0  # the text splits characters across tokens


def test_decodings_a_stream_cannot_give_are_left_to_the_whole_decode(tok):
    # Special tokens joined without spaces (OutputBuilder._joined), and a tokenizer that
    # cleans up tokenization spaces, are not what a DecodeStream gives.
    req = Request("r", [1], SamplingParams(skip_special_tokens=False,
                                           spaces_between_special_tokens=False), 99, seed=0)
    req.output_token_ids = [1, 2, 3]
    assert output_text(req, tok) is None and req.text_stream is False
    tok.clean_up_tokenization_spaces = True
    try:
        assert not supports(tok, True, True)
    finally:
        tok.clean_up_tokenization_spaces = False


@pytest.mark.parametrize("stop", ["wörld", ", ", "你好", "🤖", "ελ", "\t", " end"])
def test_a_stop_string_stops_at_the_token_a_whole_decode_finds_it(tok, stop):
    ids = tok.encode(TEXT, add_special_tokens=False)
    want = next(i for i in range(len(ids))
                if stop in tok.decode(ids[:i + 1], skip_special_tokens=True))
    checker = StopChecker(tok)
    req = Request("r", [1], SamplingParams(stop=(stop,)), 10**6, seed=0)
    for i, token in enumerate(ids):
        req.output_token_ids.append(token)
        if checker.check(req):
            break
    assert i == want and req.stop_reason == stop
    full = tok.decode(ids[:i + 1], skip_special_tokens=True)
    assert req.text == full[:full.index(stop)]
