"""The dates and amounts a document writes, in the form a JSON answer gives them: `2026-02-05` for
"5 de febrero de 2026" or "05/02/2026", `14172.43` for "14.172,43 EUR", "£14,172.43" or "14 172,43 €".

A copied date or amount field (`"x-edgellm-copy": true` on a `format: date` string or a number:
daemon/engine/constrain/copy_grammar.py) must be one of these, so a model chooses among the values the document states
instead of writing digits it may misread. English, Spanish and French writing; a numeric date is read day
first, and also month first where that is a date too (US invoices).
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date

MONTHS = {  # as written in running text (the invoice generator, models/tuning/invoices.py, writes them too)
    "en": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"],
    "es": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
           "noviembre", "diciembre"],
    "fr": ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
           "novembre", "décembre"],
}


def _plain(text: str) -> str:
    """Lower case without accents (février -> fevrier), the same length as the text."""
    return "".join(unicodedata.normalize("NFKD", c)[0] for c in text.lower())


_MONTH = {}  # a month's name as _plain reads it, and its first three and four letters -> its number
for _names in MONTHS.values():
    for _i, _name in enumerate(map(_plain, _names), 1):
        _MONTH[_name] = _i
        _MONTH.setdefault(_name[:3], _i)  # jan, feb, sept -> sep: abbreviations
        _MONTH.setdefault(_name[:4], _i)
_MONTH_RE = "|".join(sorted(_MONTH, key=len, reverse=True))

_NUMERIC = re.compile(r"(?<![\d/.-])(\d{1,2})([/.-])(\d{1,2})\2(\d{4}|\d{2})(?![\d/.-])")
_ISO = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)")
_DAY_MONTH = re.compile(rf"(?<!\d)(\d{{1,2}})(?:er|st|nd|rd|th|º)?\.?\s+(?:de\s+)?({_MONTH_RE})\.?,?\s+"
                        r"(?:de\s+)?(\d{4})", re.IGNORECASE)
_MONTH_DAY = re.compile(rf"\b({_MONTH_RE})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}})", re.IGNORECASE)
# 1,234.56 / 1.234,56 / 1 234,56 (spaces: plain, no-break, narrow no-break) / 1234.56 / 1234; read once with
# spaces as thousands separators and once without, since "3 120,00" may be a quantity and a price
_PLAIN_NUMBER = r"|(?<![\w.,])\d+(?:[.,]\d{1,2})?(?!\d)"
_AMOUNTS = [re.compile(r"(?<![\w.,])\d{1,3}(?:[" + separators + r"]\d{3})+(?:[.,]\d{1,2})?(?!\d)" + _PLAIN_NUMBER)
            for separators in (",.\u00a0\u202f ", ",.")]


def _iso(year: int, month: int, day: int) -> str | None:
    if year < 100:
        year += 2000
    try:
        return date(year, month, day).isoformat()
    except ValueError:
        return None


def dates(document: str) -> list[str]:
    """Every date the document writes, ISO, in order of appearance, once each."""
    return list(dict.fromkeys(d for _, d in sorted(_dates(document), key=lambda found: found[0])))


def _dates(document: str) -> list[tuple[tuple[int, int], str]]:
    """(where in the document, ISO date) for each date written."""
    text = _plain(document)
    found = []
    for m in _NUMERIC.finditer(text):
        a, b, year = int(m.group(1)), int(m.group(3)), int(m.group(4))
        found += [(m.span(), d) for d in (_iso(year, b, a), _iso(year, a, b)) if d]
    found += [(m.span(), d) for m in _ISO.finditer(text)
              if (d := _iso(int(m.group(1)), int(m.group(2)), int(m.group(3))))]
    found += [(m.span(), d) for m in _DAY_MONTH.finditer(text)
              if (d := _iso(int(m.group(3)), _MONTH[m.group(2).lower()], int(m.group(1))))]
    found += [(m.span(), d) for m in _MONTH_DAY.finditer(text)
              if (d := _iso(int(m.group(3)), _MONTH[m.group(1).lower()], int(m.group(2))))]
    return found


def amounts(document: str) -> list[float]:
    """Every number the document writes, in order, once each, except the parts of its dates and percentages:
    the last `.` or `,` followed by one or two digits is the decimal point, other separators group thousands."""
    in_dates = [span for span, _ in _dates(document)]
    values = []
    matches = sorted((m for pattern in _AMOUNTS for m in pattern.finditer(document)), key=lambda m: m.start())
    for m in matches:
        token = m.group(0)
        if any(a < m.end() and m.start() < b for a, b in in_dates) or document[m.end():].lstrip(" ").startswith("%"):
            continue
        decimal = re.search(r"[.,](\d{1,2})$", token)
        whole = token[: decimal.start()] if decimal else token
        digits = re.sub(r"\D", "", whole)
        values.append(float(f"{digits}.{decimal.group(1)}" if decimal else digits))
    return list(dict.fromkeys(values))


def json_number(value: float) -> str:
    """The shortest JSON literal of an amount: 14172.43, 1210."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return text or "0"
