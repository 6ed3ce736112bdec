"""Text normalization for matching names: :func:`fold` and :func:`words`.

Both sides of a match go through the same functions (the keys of an index and the query a
person typed), so "jose" finds "José", "JOSÉ" finds "josé", "zoe" finds "Zoë" and "strasse"
finds "Straße". CJK text has no case and (almost) no marks, so it folds to itself and matches
by prefix.
"""

from __future__ import annotations

import re
import unicodedata

# The two kana voicing marks are the only combining marks (category Mn) that NFKD splits off
# CJK text: "ご" is "こ" + U+3099. They change the sound, not an accent, so they are kept and
# NFC puts "ご" back together (and half-width "ｺﾞ" becomes "ゴ").
_KEPT_MARKS = frozenset("\u3099\u309a")

# Latin letters whose stroke or ligature is not a combining mark, so NFKD leaves them whole:
# without this "lukasz" would not find "Łukasz", nor "soren" "Søren". Applied after casefold
# (lower case only; U+0131 is the dotless i). The same kind of table as Lucene's
# ASCIIFoldingFilter, kept small.
_LETTERS = str.maketrans(
    {"ł": "l", "ø": "o", "đ": "d", "ħ": "h", "\u0131": "i", "ŧ": "t", "ð": "d"}
    | {"æ": "ae", "œ": "oe", "þ": "th"}
)

_ASCII_WORD = re.compile(r"[A-Za-z0-9]+")

# Scripts written without spaces between words, whose runs are kept whole by words().
_CJK_RANGES = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x3005, 0x3007),  # iteration mark, closing mark, ideographic zero
    (0x3040, 0x30FF),  # Hiragana, Katakana (and the voicing marks)
    (0x3100, 0x312F),  # Bopomofo
    (0x3130, 0x318F),  # Hangul compatibility Jamo
    (0x31A0, 0x31FF),  # Bopomofo extended, CJK strokes, Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xA960, 0xA97F),  # Hangul Jamo extended A
    (0xAC00, 0xD7FF),  # Hangul syllables, Hangul Jamo extended B
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFFDC),  # half-width Katakana and Hangul
    (0x20000, 0x3FFFF),  # CJK unified ideographs extensions B and later (planes 2 and 3)
)


def fold(s: str) -> str:
    """The form of ``s`` that matching compares: compatibility-decomposed (NFKD), casefolded,
    combining marks (category Mn) dropped, a few stroked Latin letters and ligatures spelled
    plainly ("ł" -> "l", "ø" -> "o", "æ" -> "ae", ...), recomposed (NFC).

    "José" -> "jose", "Zoë" -> "zoe", "STRASSE" and "Straße" -> "strasse", full-width
    "\uff2a\uff4f\uff53\uff45" -> "jose", "山田太郎" -> "山田太郎". The casefold sits
    between two NFKDs, as Unicode's caseless matching does, so no mark it produces survives;
    ``fold`` is idempotent. ASCII text (most names) takes a fast path: it only needs
    ``lower()``.
    """
    if s.isascii():
        return s.lower()
    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", s).casefold())
    kept = "".join(c for c in decomposed if c in _KEPT_MARKS or unicodedata.category(c) != "Mn")
    return unicodedata.normalize("NFC", kept.translate(_LETTERS))


def is_cjk(c: str) -> bool:
    """Whether the character ``c`` belongs to a script written without spaces between words
    (Han, kana, Hangul, Bopomofo)."""
    cp = ord(c)
    return cp >= 0x1100 and any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def words(s: str) -> list[str]:
    """The words of a name, in order, without duplicates.

    Words are runs of letters, digits and marks; everything else (whitespace, punctuation,
    symbols) separates them: "Jean-Luc O'Brien" -> ["Jean", "Luc", "O", "Brien"]. A CJK run is
    one word, and is split from letters of other scripts next to it ("田中Mike" -> ["田中",
    "Mike"]). When the name has CJK and more than one word, the words joined without
    separators are one more word, so a prefix of the whole name matches: "山田 太郎" ->
    ["山田", "太郎", "山田太郎"], and "ジョン・スミス" -> [..., "ジョンスミス"].

    Pass folded text to get folded words (``words(fold(name))``); ``words`` itself keeps the
    case it is given.
    """
    if s.isascii():
        return list(dict.fromkeys(_ASCII_WORD.findall(s)))
    found: list[str] = []
    start = -1  # start of the current word, -1 between words
    cjk_run = False
    any_cjk = False
    for i, c in enumerate(s):
        if unicodedata.category(c)[0] in "LNM":
            cjk = is_cjk(c)
            any_cjk = any_cjk or cjk
            if start < 0:
                start, cjk_run = i, cjk
            elif cjk != cjk_run:
                found.append(s[start:i])
                start, cjk_run = i, cjk
        elif start >= 0:
            found.append(s[start:i])
            start = -1
    if start >= 0:
        found.append(s[start:])
    if any_cjk and len(found) > 1:
        found.append("".join(found))
    return list(dict.fromkeys(found))
