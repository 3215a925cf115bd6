"""Caption cleaning for scraped alt-texts.

Scraped captions arrive double-escaped (`&amp;quot;`), as mojibake (`cafÃ©`), with stray bytes that are not UTF-8
(Latin-1 pages mislabelled as UTF-8) and with newlines and tabs from the page layout.
"""

import html
import re
from typing import Any

import ftfy

# Lone surrogates U+DC80..U+DCFF are what `errors="surrogateescape"` makes of bytes that are not valid UTF-8.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]+")
_OTHER_SURROGATES = re.compile("[\ud800-\udfff]")
# Zero-width space/non-joiner/joiner, word joiner, BOM: invisible, but the tokenizer turns them into tokens.
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
# Cleaning is linear in the input (ftfy on a 1 MB alt-text takes seconds) and rarely shrinks text by more than this
# factor, so longer input is cut before cleaning: the result is cut to max_length anyway.
_RAW_FACTOR = 8


def repair_undecodable(text: str) -> str:
    """Turns bytes kept by `surrogateescape` back into characters: such bytes are almost always cp1252/Latin-1.

    Valid UTF-8 around them is left alone; any other lone surrogate becomes U+FFFD (Arrow refuses surrogates).
    """
    if text.isascii():
        return text

    def decode(match: re.Match) -> str:
        raw = bytes(ord(c) - 0xDC00 for c in match.group(0))
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D are unassigned in cp1252
            return raw.decode("latin-1")

    text = _ESCAPED_BYTES.sub(decode, text)
    return _OTHER_SURROGATES.sub("\ufffd", text)


def clean_caption(value: Any, max_length: int) -> str:
    """ftfy + zero-width characters removed + repeated HTML unescape + whitespace collapse + length cap (at a word
    boundary when one is close). Input beyond 8 x max_length characters is dropped before cleaning."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if max_length:
        text = text[: max_length * _RAW_FACTOR]
    text = ftfy.fix_text(repair_undecodable(text))
    for _ in range(3):  # `&amp;quot;` needs two rounds; three bounds the work on adversarial input
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    text = " ".join(_INVISIBLE.sub("", text).replace("\ufffd", " ").split())  # after unescape: &#8203; is one too
    if max_length and len(text) > max_length:
        cut = text[:max_length]
        space = cut.rfind(" ")
        text = cut[:space] if space >= max_length * 0.8 else cut
        text = text.rstrip()
    return text
