"""Tokenizers built in code, so the zoo pipelines run with no model hub and no shipped files.

The ids they produce are meaningless (the text encoders have random weights anyway); what matters
is that diffusers' pipelines can call them exactly as they call the real ones: padding to
``max_length``, truncation, ``padding="longest"`` for the truncation warning, ``batch_decode``,
and the special-token ids the text encoders read (CLIP pools at the first ``<|endoftext|>``).

Both are small, so the tiny text encoders can use ``vocab_size = len(tokenizer)``; every id is
also below the full-size vocab sizes (49408 for CLIP, 32128 for T5).
"""

from __future__ import annotations

import functools
import string

# A few words get whole-word BPE merges / unigram pieces so common prompts tokenize into
# words rather than single bytes; anything else still encodes (byte fallback / <unk>).
_WORDS = (
    "a an the of in on with and at by for to is photo picture painting portrait close up high quality "
    "detailed cat dog astronaut horse riding sitting red blue green white black small big beautiful "
    "landscape city mountain sky forest sunset woman man"
).split()

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: byte value -> printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    order = sorted(range(256), key=lambda i: bs[i])  # index by byte value
    return [chr(cs[i]) for i in order]


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab laid out like CLIP's: bytes, bytes+</w>, merge results, then the two specials last.

    Keeping <|endoftext|> as the largest id matters: CLIP configs with eos_token_id == 2 (the
    published ones) pool at ``input_ids.argmax(-1)``, which must land on the end token.
    """
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        # Merge left to right: ((w o) r) d</w> ...
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            left = left + right
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


@functools.lru_cache(maxsize=None)
def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIP BPE tokenizer (SD1.5 / SDXL / FLUX / SD3 ``tokenizer``), model_max_length 77.

    ``pad_token="!"`` gives the SDXL/SD3 ``tokenizer_2`` flavour (OpenCLIP pads with "!", id 0).
    Cached per process: treat the result as read-only.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def clip_g_tokenizer():
    """SDXL / SD3 ``tokenizer_2``: same vocabulary, pads with "!" like the published one."""
    return clip_tokenizer(pad_token="!")


def _t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces: T5's special ids (<pad>=0, </s>=1, <unk>=2), words, then single chars."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for w in _WORDS:
        add("\u2581" + w, -5.0)
    for c in string.ascii_letters + string.digits + string.punctuation:
        add("\u2581" + c, -9.0)
        add(c, -10.0)
    return pieces


@functools.lru_cache(maxsize=None)
def t5_tokenizer():
    """T5 unigram tokenizer (FLUX ``tokenizer_2``, SD3 ``tokenizer_3``, PixArt), model_max_length 512.

    transformers 5's ``T5Tokenizer`` *is* the tokenizers-backed fast class (``T5TokenizerFast``
    is an alias), so this is what the pipelines' type hints expect. No sentinel ``<extra_id_*>``
    tokens: nothing in inference uses them. Cached per process: treat as read-only.
    """
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=T5_MAX_LENGTH)


def build_tokenizer(kind: str):
    """Tokenizer by kind name as used in configs.pipeline_spec: "clip", "clip_g" or "t5"."""
    builders = {"clip": clip_tokenizer, "clip_g": clip_g_tokenizer, "t5": t5_tokenizer}
    if kind not in builders:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {tuple(builders)}")
    return builders[kind]()
