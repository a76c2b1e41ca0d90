"""A CLIP-style byte-level BPE tokenizer learned from a word list, offline.

Real Stable Diffusion models ship their CLIP tokenizer; tiny test models and
the toy model cannot download one, so they learn a small BPE vocabulary here.
The files follow the layout CLIP uses (``vocab.json`` + ``merges.txt``), so
``CLIPTokenizer.from_pretrained(folder)`` loads them like any real tokenizer.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def split_words(texts: list[str]) -> list[str]:
    """Lower-cased words as CLIP's pre-tokenizer sees them (letters, digits, single marks)."""
    words: list[str] = []
    for text in texts:
        words += re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())
    return words


def learn_merges(texts: list[str], max_merges: int = 2000) -> list[tuple[str, str]]:
    """Learn BPE merges until every word of ``texts`` is one token (or ``max_merges``).

    Standard BPE training: merge the most frequent adjacent pair everywhere,
    repeat. Applying the merges by rank replays this order, so each training
    word comes out as a single token.
    """
    byte_map = bytes_to_unicode()
    counts = collections.Counter(split_words(texts))
    words = {}
    for word, count in counts.items():
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] = count
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: collections.Counter = collections.Counter()
        for symbols, count in words.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = count
        words = merged
    return merges


def write_clip_tokenizer(texts: list[str], folder: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Learn a vocabulary from ``texts``, write CLIP tokenizer files to ``folder``, return it loaded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges = learn_merges(texts)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)
    tok.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)
