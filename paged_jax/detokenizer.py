"""Incremental detokenization: a request's output text, extended by the tokens each step appends.

Decoding the whole output every step (for streamed text, or to look for a stop string) costs
O(length) a token, O(length^2) a request: at 256 streams of 200 tokens that was 24 ms of host
work a step (docs/RESULTS.md, host overhead). A TextStream feeds each token once to the
tokenizers library's DecodeStream, which returns the text a token completes, or None while it
holds bytes of a character not finished yet (a multi-byte character split across tokens, with
what precedes it in the same token).

Used only where its text is the whole decode's: byte-level BPE tokenizers (GPT-2's decoder:
SmolLM2, Llama 3, Qwen, ...), no clean-up of tokenization spaces, and the decoding that
tokenizer.decode does (not the join of special tokens without spaces, OutputBuilder._joined).
While nothing is held back, TextStream.text equals tokenizer.decode(ids) (tests/
test_detokenizer.py checks this on random token ids); while something is, it is that decode's
text less the held tail. Elsewhere callers decode the whole output, as before.
"""
from __future__ import annotations

from paged_jax.request import Request


class TextStream:
    def __init__(self, backend, skip_special_tokens: bool):
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.text = ""
        self.num_tokens = 0  # tokens fed
        self.held = 0  # trailing tokens fed whose text is not complete yet

    def extend(self, ids: list[int]) -> None:
        """Feeds ids[num_tokens:] (a request's output only grows)."""
        for token in ids[self.num_tokens:]:
            piece = self._stream.step(self._backend, token)
            if piece is None:
                self.held += 1
            else:
                self.text += piece
                self.held = 0
        self.num_tokens = len(ids)


def supports(tokenizer, skip_special_tokens: bool, spaces_between_special_tokens: bool) -> bool:
    """Whether a TextStream gives this tokenizer's decode of an output."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return (backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
            and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
            and (skip_special_tokens or spaces_between_special_tokens))


def output_text(req: Request, tokenizer, complete: bool = False) -> str | None:
    """The request's output text so far from its TextStream (made on first use, kept on the
    request), or None where a stream cannot give the tokenizer's decode. complete: None too
    while the stream holds back a tail (the caller needs every character, e.g. a stop
    string may end just before a held byte)."""
    stream = req.text_stream
    if stream is None:
        p = req.params
        if not supports(tokenizer, p.skip_special_tokens, p.spaces_between_special_tokens):
            req.text_stream = False  # (asked once a request)
            return None
        stream = req.text_stream = TextStream(tokenizer.backend_tokenizer,
                                              p.skip_special_tokens)
    elif stream is False:
        return None
    stream.extend(req.output_token_ids)
    if complete and stream.held:
        return None
    return stream.text
