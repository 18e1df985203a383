"""A real CLIP byte-level BPE tokenizer for the toy world's vocabulary.

The files (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``) have exactly
the layout of OpenAI's CLIP tokenizer, only smaller, so ``transformers.CLIPTokenizer`` loads them unchanged:

- ids 0..255: the 256 byte symbols of GPT-2/CLIP's byte-to-unicode table; 256..511: the same with the
  end-of-word marker ``</w>``. Every byte is therefore in the vocabulary, so *any* text tokenizes (unknown words
  fall back to sub-word / single-byte tokens), never a crash and never an unknown token;
- then one id per BPE merge, learned here with the standard greedy algorithm on the world's words until every
  word is a single token;
- last ``<|startoftext|>`` and ``<|endoftext|>`` (also the padding token, as in CLIP / Stable Diffusion).

Sequences are padded / truncated to :data:`MAX_LENGTH` = 16 tokens (the longest grammar prompt needs 13,
including BOS and EOS); the text encoder's ``max_position_embeddings`` equals it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .world import vocabulary

MAX_LENGTH = 16
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _word_symbols(word: str, byte_encoder: dict[int, str]) -> tuple[str, ...]:
    chars = [byte_encoder[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + "</w>",)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE (most frequent adjacent pair first, ties broken lexicographically for determinism) until every
    word is one symbol. Applying these merges in rank order, as CLIP's BPE does, reproduces the learned
    segmentation, so every vocabulary word encodes to exactly one token."""
    enc = bytes_to_unicode()
    corpus = {w: list(_word_symbols(w, enc)) for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for syms in corpus.values():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, syms in corpus.items():
            out: list[str] = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            corpus[w] = out


def write_tokenizer_files(directory: str | Path) -> Path:
    """Writes the toy CLIP tokenizer (deterministic: a function of the grammar only) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A tokenizer.json (what save_pretrained of a tokenizers-backed tokenizer adds) would take precedence over
    # vocab.json + merges.txt when loading; the hand-written files are the source of truth, so drop it.
    (directory / "tokenizer.json").unlink(missing_ok=True)
    enc = bytes_to_unicode()
    base = list(enc.values())
    tokens = base + [c + "</w>" for c in base]
    merges = learn_merges(vocabulary())
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (directory / "merges.txt").write_text(merges_txt, encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def toy_tokenizer_path() -> Path:
    """The tokenizer folder of the shipped base model."""
    from .model import toy_model_path

    return toy_model_path() / "tokenizer"


def load_toy_tokenizer(path: str | Path | None = None):  # -> transformers.CLIPTokenizer
    """Loads the toy tokenizer with ``transformers.CLIPTokenizer`` (the shipped one when ``path`` is None)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path if path is not None else toy_tokenizer_path()))
