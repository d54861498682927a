"""Synthetic invoices in English, Spanish and French, each with the gold JSON it was rendered from.

Seeded and reproducible: the same seed gives the same invoices, byte for byte.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from edgellm.daemon.engine.constrain.document_values import MONTHS
from edgellm.models.tuning.invoice_layouts import FAMILIES, Facts, invoice_number, render, vendor_name

LANGUAGES = ("en", "es", "fr")
FIELDS = ("vendor", "invoice_number", "date", "total", "currency", "vat")
INSTRUCTION = "Extract the invoice fields as JSON."

SCHEMA = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "maxLength": 60},
        "invoice_number": {"type": "string", "maxLength": 30},
        "date": {"type": "string", "format": "date", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "total": {"type": "number"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
        "vat": {"type": "number"},
    },
    "required": list(FIELDS),
    "additionalProperties": False,
}

# The same fields taken from the invoice (x-edgellm-copy: daemon/engine/constrain/copy_grammar.py): the vendor and the
# invoice number verbatim, the date as one of the dates it writes, the total and VAT as amounts it writes; a
# copied string carries no length bound of its own.
COPY_SCHEMA = {**SCHEMA, "properties": {
    **SCHEMA["properties"], "vendor": {"type": "string", "x-edgellm-copy": True},
    "invoice_number": {"type": "string", "x-edgellm-copy": True},
    "date": {**SCHEMA["properties"]["date"], "x-edgellm-copy": True},
    "total": {"type": "number", "x-edgellm-copy": True}, "vat": {"type": "number", "x-edgellm-copy": True}}}

VENDORS = {
    "en": ["Acme Tools Ltd", "Northwind Traders Inc", "Oak & Pine Carpentry", "Highland Wool Ltd",
           "Lakeside Printing Co", "Sparkle Cleaning LLC", "Pacific Seafood Co", "Brightline Electrical"],
    "es": ["Ferretería López S.L.", "Transportes García S.A.", "Clínica Dental Sonrisa", "Librería Cervantes",
           "Hotel Mar Azul", "Talleres Martínez S.L.", "Panadería La Espiga", "Construcciones Ruiz S.A."],
    "fr": ["Boulangerie Martin SARL", "Dupont Électricité", "Garage Lefèvre", "Cabinet Moreau Avocats",
           "Imprimerie Rousseau", "Plomberie Girard", "Transports Bernard SA", "Atelier Petit & Fils"],
}
ITEMS = {
    "en": ["Consulting hours", "Spare parts", "Cleaning service", "Printing", "Delivery", "Maintenance visit"],
    "es": ["Horas de consultoría", "Piezas de repuesto", "Servicio de limpieza", "Impresión", "Transporte",
           "Visita de mantenimiento"],
    "fr": ["Heures de conseil", "Pièces détachées", "Service de nettoyage", "Impression", "Livraison",
           "Visite d'entretien"],
}
LABELS = {
    "en": {"title": "INVOICE", "number": "Invoice No.", "date": "Date", "item": "Description", "qty": "Qty",
           "subtotal": "Subtotal", "vat": "VAT", "total": "Total due", "from": "From"},
    "es": {"title": "FACTURA", "number": "Nº de factura", "date": "Fecha", "item": "Concepto", "qty": "Cant.",
           "subtotal": "Base imponible", "vat": "IVA", "total": "Total a pagar", "from": "Emisor"},
    "fr": {"title": "FACTURE", "number": "Facture n°", "date": "Date", "item": "Désignation", "qty": "Qté",
           "subtotal": "Total HT", "vat": "TVA", "total": "Total TTC", "from": "Émetteur"},
}
VAT_RATES = {"en": (0.20, 0.0), "es": (0.21, 0.10), "fr": (0.20, 0.055)}
SYMBOL = {"EUR": "€", "USD": "$", "GBP": "£"}


def format_amount(value: float, currency: str, lang: str, style: int) -> str:
    """Local separators: 1,234.56 in English; 1.234,56 in Spanish; 1 234,56 in French."""
    whole, cents = f"{value:,.2f}".split(".")
    if lang == "es":
        whole = whole.replace(",", ".")
    elif lang == "fr":
        whole = whole.replace(",", "\u202f" if style else " ")
    number = f"{whole}.{cents}" if lang == "en" else f"{whole},{cents}"
    if lang == "en" and currency in ("USD", "GBP") and style == 0:
        return f"{SYMBOL[currency]}{number}"
    return f"{number} {SYMBOL[currency] if style else currency}"


def format_date(d: date, lang: str, style: int) -> str:
    """Dates as people write them: 03/12/2026 (US), 12 de marzo de 2026, 3 mars 2026, 12/03/2026."""
    if style == 0:
        return d.strftime("%m/%d/%Y") if lang == "en" else d.strftime("%d/%m/%Y")
    month = MONTHS[lang][d.month - 1]
    return {"en": f"{d.day} {month} {d.year}", "es": f"{d.day} de {month} de {d.year}",
            "fr": f"{'1er' if d.day == 1 else d.day} {month} {d.year}"}[lang]


@dataclass
class Invoice:
    lang: str
    text: str
    gold: dict
    family: str = "classic"

    def to_json(self) -> str:
        return json.dumps({"lang": self.lang, "family": self.family, "text": self.text, "gold": self.gold},
                          ensure_ascii=False)


def make_invoice(rng: random.Random, lang: str, family: str = "classic") -> Invoice:
    """One invoice in `family`'s layout (models/tuning/invoice_layouts.py). `classic` draws exactly as it always
    has, so a seed still gives the invoices it gave before families existed."""
    L = LABELS[lang]
    if family == "classic":
        vendor = rng.choice(VENDORS[lang])
        prefix = {"en": "INV", "es": "F", "fr": "FA"}[lang]
        number = f"{prefix}-{rng.randint(2024, 2026)}-{rng.randint(1, 9999):04d}"
    else:
        vendor, number = vendor_name(rng, lang), invoice_number(rng)
    day = date(2025, 1, 1) + timedelta(days=rng.randint(0, 700))
    currency = "EUR" if lang != "en" else rng.choice(["USD", "GBP", "EUR"])
    items = [(rng.choice(ITEMS[lang]), rng.randint(1, 12), round(rng.uniform(5, 900), 2))
             for _ in range(rng.randint(1, 4))]
    subtotal = round(sum(q * p for _, q, p in items), 2)
    rate = rng.choice(VAT_RATES[lang])
    vat = round(subtotal * rate, 2)
    total = round(subtotal + vat, 2)
    style = rng.randint(0, 1)

    def money(v: float) -> str:
        return format_amount(v, currency, lang, style)

    gold = {"vendor": vendor, "invoice_number": number, "date": day.isoformat(), "total": total,
            "currency": currency, "vat": vat}
    if family != "classic":
        facts = Facts(lang, vendor, number, day, currency, items, subtotal, rate, vat, total)
        date_style = rng.randint(0, 1)
        text = render(family, rng, facts, money, lambda d: format_date(d, lang, date_style))
        if vendor not in text:  # the answer names the vendor as the invoice writes it, a receipt's capitals
            # too: a copied field (x-edgellm-copy) is verbatim, and a model taught to re-case fights its grammar
            gold["vendor"] = vendor.upper()
        return Invoice(lang, text, gold, family)
    lines = [f"{name} | {q} | {money(p)}" for name, q, p in items]
    header = [f"{L['title']}", f"{L['from']}: {vendor}", f"{L['number']} {number}",
              f"{L['date']}: {format_date(day, lang, rng.randint(0, 1))}"]
    if rng.random() < 0.5:
        header = [f"{vendor}", f"{L['title']} {number}", header[3]]
    percent = f"{rate * 100:g}" if lang == "en" else f"{rate * 100:g}".replace(".", ",")
    totals = [f"{L['subtotal']}: {money(subtotal)}", f"{L['vat']} {percent}%: {money(vat)}",
              f"{L['total']}: {money(total)}"]
    price = {"en": "Price", "es": "Precio", "fr": "Prix"}[lang]
    text = "\n".join([*header, "", f"{L['item']} | {L['qty']} | {price}", *lines, "", *totals])
    return Invoice(lang, text, gold)


def generate(n: int, seed: int, languages: tuple[str, ...] = LANGUAGES,
             families: tuple[str, ...] = ("classic",)) -> list[Invoice]:
    """`n` invoices, languages in turn and, within each language, the families in turn."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown layout families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    rng = random.Random(seed)
    return [make_invoice(rng, languages[i % len(languages)], families[i // len(languages) % len(families)])
            for i in range(n)]


def write_jsonl(invoices: list[Invoice], path: Path) -> None:
    path.write_text("".join(inv.to_json() + "\n" for inv in invoices))


def values_present(text: str, gold: dict, lang: str) -> bool:
    """Whether every gold value can still be read from `text` in one of its local renderings: the check that
    keeps a model-written variant only if it did not drop or alter a value."""
    if gold["vendor"] not in text or gold["invoice_number"] not in text:
        return False
    day = date.fromisoformat(gold["date"])
    if not any(format_date(day, lang, style) in text for style in (0, 1)):
        return False
    amounts = [gold["total"], gold["vat"]]
    return all(any(format_amount(v, gold["currency"], lang, style).split(" ")[0].lstrip("$£") in text
                   for style in (0, 1)) for v in amounts)
