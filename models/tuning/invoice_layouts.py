"""Layout families for the synthetic invoices: the same facts written the ways real invoices write them.

`classic` is the generator's original layout (vendor, number, date, a `|` table, totals). The others are
what invoices in the three countries also look like, and what a model trained on `classic` alone has never
seen: a letterhead with the customer's name, a tax ID and an order number beside the invoice's own
(`letterhead`), a form of `label ..... value` lines in any order (`form`), a till receipt (`receipt`), an
invoice told in an e-mail (`email`), and a posted cover letter that states the invoice in prose under the
vendor's letterhead (`letter`). Each family has its own labels, invoice-number patterns and vendor
names, and puts in hard negatives: a second company, a quote or order number, a due date, a VAT ID.
Training on some families and testing on the others (leave-family-out) measures what a model learned about
invoices rather than about our templates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta

FAMILIES = ("classic", "letterhead", "form", "receipt", "email", "letter")


@dataclass
class Facts:
    """What an invoice says, whatever its layout; `money` and `day` render amounts and dates locally."""

    lang: str
    vendor: str
    number: str
    day: date
    currency: str
    items: list[tuple[str, int, float]]
    subtotal: float
    rate: float
    vat: float
    total: float


SURNAMES = {"en": ["Hartley", "Brennan", "Whitfield", "Okafor", "Lindqvist", "Marsh", "Callahan", "Pryce"],
            "es": ["Navarro", "Iglesias", "Castillo", "Fuentes", "Morales", "Vidal", "Herrera", "Soler"],
            "fr": ["Lambert", "Fontaine", "Chevalier", "Renaud", "Mercier", "Gauthier", "Perrin", "Roux"]}
TRADES = {"en": ["Roofing", "Catering", "Logistics", "Joinery", "Software", "Plumbing", "Signs", "Dairy"],
          "es": ["Reformas", "Catering", "Logística", "Carpintería", "Informática", "Fontanería", "Rótulos",
                 "Lácteos"],
          "fr": ["Toitures", "Traiteur", "Logistique", "Menuiserie", "Informatique", "Plomberie", "Enseignes",
                 "Laiterie"]}
FORMS = {"en": ["Ltd", "LLP", "& Sons", "Group plc"], "es": ["S.L.", "S.A.", "e Hijos S.L.", "S.L.U."],
         "fr": ["SARL", "SAS", "et Fils", "EURL"]}
CUSTOMERS = {"en": "Greenfield Dental Practice", "es": "Gestoría Álvarez y Asociados",
             "fr": "Pharmacie du Centre"}


def vendor_name(rng: random.Random, lang: str) -> str:
    surname, trade, form = rng.choice(SURNAMES[lang]), rng.choice(TRADES[lang]), rng.choice(FORMS[lang])
    return f"{surname} {trade} {form}" if lang == "en" else f"{trade} {surname} {form}"


def invoice_number(rng: random.Random) -> str:
    year = rng.randint(2024, 2026)
    return rng.choice([f"{year}/{rng.randint(1, 999):03d}", f"A{rng.randint(10000, 99999)}",
                       f"{rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
                       f"FV{year % 100}{rng.randint(1, 9999):04d}"])


# "reference": the generic labels an invoice number also goes by ("No.", "Pièce n°"); letterhead and form
# draw from them beside "number", so a model learns the code beside a label, not a few labels
LABELS = {
    "en": {"number": ["Invoice #", "Invoice number:", "Our ref. (invoice):", "Tax invoice no."],
           "date": ["Invoice date:", "Issued:", "Date of issue:"], "due": "Due date:", "order": "PO number:",
           "taxid": "VAT reg. no.", "bill": "Bill to:", "vat": ["VAT", "Tax", "Sales tax"],
           "total": ["Amount due", "Balance due", "TOTAL", "Grand total"], "net": ["Net", "Subtotal"],
           "receipt": "Receipt", "thanks": "Thank you for your business", "title": "INVOICE",
           "office": "Registered office",
           "reference": ["No.", "Document no.", "Ref.", "Bill no.:"],
           "mark": ["Page 1 of 1", "Page: 1/1", "ORIGINAL", "Copy: customer"],
           "greeting": ["Dear Sir or Madam,", "Dear customer,", "Dear Sirs,"],
           "cover": ["Please find below our invoice for the work done.", "We invoice you as follows:"],
           "closing": ["Yours faithfully,", "Best regards,", "Sincerely,"]},
    "es": {"number": ["Factura núm.", "Número de factura:", "N.º factura:", "Factura:"],
           "date": ["Fecha de emisión:", "Fecha factura:", "Emitida el"], "due": "Vencimiento:",
           "order": "Pedido n.º", "taxid": "CIF:", "bill": "Cliente:", "vat": ["IVA", "Cuota IVA", "I.V.A."],
           "total": ["TOTAL FACTURA", "Importe total", "Total"], "net": ["Base imponible", "Subtotal"],
           "receipt": "Ticket", "thanks": "Gracias por su visita", "title": "FACTURA",
           "office": "Domicilio social",
           "reference": ["Nº", "Documento n.º", "Ref.:", "Serie y número:"],
           "mark": ["Página 1 de 1", "Página: 1/1", "ORIGINAL", "Copia: cliente"],
           "greeting": ["Estimado cliente:", "Muy señores nuestros:", "Estimados señores:"],
           "cover": ["Les detallamos a continuación nuestra factura.", "Por los trabajos realizados:"],
           "closing": ["Un saludo,", "Saludos cordiales,", "Reciban un cordial saludo,"]},
    "fr": {"number": ["Facture N°", "Numéro de facture :", "Réf. facture :", "Facture :"],
           "date": ["Date de facturation :", "Émise le", "Date :"], "due": "Échéance :",
           "order": "Bon de commande n°", "taxid": "N° TVA intracom. :", "bill": "Client :",
           "vat": ["TVA", "Montant TVA", "T.V.A."], "total": ["Net à payer", "Total TTC", "Montant TTC"],
           "net": ["Total HT", "Montant HT"], "receipt": "Ticket de caisse", "thanks": "Merci de votre visite",
           "title": "FACTURE", "office": "Siège social",
           "reference": ["N°", "Pièce n°", "Référence :", "Document n°"],
           "mark": ["Page 1/1", "Page : 1 sur 1", "ORIGINAL", "Exemplaire : client"],
           "greeting": ["Madame, Monsieur,", "Cher client,", "Chère cliente, cher client,"],
           "cover": ["Veuillez trouver ci-dessous notre facture.", "Pour les travaux réalisés :"],
           "closing": ["Salutations distinguées,", "Bien à vous,", "Avec nos remerciements,"]},
}
TAX_IDS = {"en": "GB{}", "es": "B{}", "fr": "FR{}"}


def render(family: str, rng: random.Random, f: Facts, money, day) -> str:
    """The invoice's text in one of the non-classic families (classic stays in models/tuning/invoices.py)."""
    L = LABELS[f.lang]
    pick = rng.choice
    other = invoice_number(rng)  # a second number: an order or quote reference beside the invoice's own
    tax_id = TAX_IDS[f.lang].format(rng.randint(10_000_000, 99_999_999))
    due = f.day + timedelta(days=pick([15, 30, 45]))
    percent = f"{f.rate * 100:g}" if f.lang == "en" else f"{f.rate * 100:g}".replace(".", ",")
    lines = [(name, q, money(p)) for name, q, p in f.items]
    # letterhead and form (drawn for these two families alone, so receipts and e-mails of a seed stay what
    # they were): half of them name the vendor only in the legal footer, as many European invoices do, and
    # half open with a page or copy mark, so the first line is not always the vendor or the title
    paper = family in ("letterhead", "form")
    footer = paper and rng.random() < 0.5
    mark = [pick(L["mark"])] if paper and rng.random() < 0.5 else []
    # half of the letterheads address the customer as a letter does, so a salutation at the top is not
    # taken for the vendor (who heads the letter, or stands in its legal footer)
    greeting = [pick(L["greeting"]), pick(L["cover"]), ""] if family == "letterhead" and rng.random() < 0.5 else []
    # and close as a letter does, signed with the vendor's name, so the name under a closing is read as the
    # sender, whatever stands at the top
    closing = ["", pick(L["closing"]), f.vendor] if greeting else []
    legal = f"{L['office']}: {f.vendor}, {L['taxid']} {tax_id}"
    if family == "letterhead":
        sep = pick(["  ", "\t", " - "])
        top = [L["title"]] if footer else [f.vendor.upper() if rng.random() < 0.5 else f.vendor,
                                           f"{L['taxid']} {tax_id}"]
        return "\n".join([
            *mark, *top, "",
            L["bill"], CUSTOMERS[f.lang], "", *greeting, f"{pick(L['number'] + L['reference'])} {f.number}",
            f"{L['order']} {other}",
            f"{pick(L['date'])} {day(f.day)}", f"{L['due']} {day(due)}", "",
            *[f"{q}{sep}{name}{sep}{p}" for name, q, p in lines], "",
            f"{pick(L['net'])}: {money(f.subtotal)}", f"{pick(L['vat'])} ({percent}%): {money(f.vat)}",
            f"{pick(L['total'])}: {money(f.total)}", *closing, *(["", legal] if footer else [])])
    if family == "form":
        fields = [(L["taxid"].rstrip(" :"), tax_id), (pick(L["number"] + L["reference"]).rstrip(" :#"), f.number),
                  (L["order"].rstrip(" :°nº.").rstrip(), other), (pick(L["date"]).rstrip(" :"), day(f.day)),
                  (L["due"].rstrip(" :"), day(due)), (pick(L["vat"]), money(f.vat)),
                  (pick(L["total"]), money(f.total))]
        rng.shuffle(fields)
        dots = pick([" ..... ", ": ", " = ", " | "])
        if footer:
            return "\n".join([*mark, L["title"], "", *[f"{k}{dots}{v}" for k, v in fields], "", legal])
        return "\n".join([*mark, f.vendor, "", *[f"{k}{dots}{v}" for k, v in fields]])
    if family == "receipt":
        width = 32
        body = [f"{name[:18]:<18}{p:>14}" for name, q, p in lines]
        return "\n".join([f.vendor.upper().center(width), tax_id.center(width), "-" * width,
                          f"{L['receipt']} {f.number}", day(f.day), "-" * width, *body, "-" * width,
                          f"{pick(L['total']).upper():<16}{money(f.total):>16}",
                          f"{pick(L['vat']) + ' ' + percent + '%':<16}{money(f.vat):>16}", "",
                          L["thanks"]])
    if family == "email":
        text = {
            "en": (f"Subject: {pick(L['number']).rstrip(':')} {f.number}\n\nDear {CUSTOMERS['en']},\n\nPlease find "
                   f"our invoice {f.number} dated {day(f.day)} for your order {other}. The amount of "
                   f"{money(f.total)} (including {money(f.vat)} VAT) is due by {day(due)}.\n\nKind regards,\n"
                   f"{f.vendor}"),
            "es": (f"Asunto: factura {f.number}\n\nEstimados señores de {CUSTOMERS['es']}:\n\nLes adjuntamos la "
                   f"factura {f.number} con fecha {day(f.day)}, correspondiente al pedido {other}, por un importe "
                   f"total de {money(f.total)} (IVA incluido: {money(f.vat)}), con vencimiento el {day(due)}."
                   f"\n\nAtentamente,\n{f.vendor}"),
            "fr": (f"Objet : facture {f.number}\n\nMadame, Monsieur,\n\nVeuillez trouver ci-joint la facture "
                   f"{f.number} du {day(f.day)} relative à votre commande {other}, d'un montant de "
                   f"{money(f.total)} TTC (dont TVA {money(f.vat)}), payable avant le {day(due)}.\n\n"
                   f"Cordialement,\n{f.vendor}"),
        }
        return text[f.lang]
    if family == "letter":
        city = {"en": "Leeds", "es": "Valencia", "fr": "Lyon"}[f.lang]
        text = {
            "en": (f"{f.vendor}\n12 Mill Lane, {city}\n{L['taxid']} {tax_id}\n\n{CUSTOMERS['en']}\n\n"
                   f"Our ref.: {f.number}    Your ref.: {other}\n{city}, {day(f.day)}\n\nDear Sirs,\n\nWe "
                   f"enclose invoice {f.number} of {day(f.day)}: net {money(f.subtotal)}, VAT at {percent}% "
                   f"{money(f.vat)}, total {money(f.total)}, payable by {day(due)}.\n\nYours faithfully,"
                   f"\nAccounts Department"),
            "es": (f"{f.vendor}\nC/ Mayor 12, {city}\n{L['taxid']} {tax_id}\n\n{CUSTOMERS['es']}\n\n"
                   f"N/Ref.: {f.number}    S/Ref.: {other}\n{city}, {day(f.day)}\n\nMuy señores nuestros:"
                   f"\n\nLes remitimos la factura {f.number} de fecha {day(f.day)}: base imponible "
                   f"{money(f.subtotal)}, IVA {percent}% {money(f.vat)}, total {money(f.total)}, a pagar antes "
                   f"del {day(due)}.\n\nUn cordial saludo,\nDepartamento de Administración"),
            "fr": (f"{f.vendor}\n12 rue de la Gare, {city}\n{L['taxid']} {tax_id}\n\n{CUSTOMERS['fr']}\n\n"
                   f"N/Réf. : {f.number}    V/Réf. : {other}\n{city}, le {day(f.day)}\n\nMadame, Monsieur,"
                   f"\n\nNous vous adressons la facture {f.number} du {day(f.day)} : total HT "
                   f"{money(f.subtotal)}, TVA {percent} % {money(f.vat)}, net à payer {money(f.total)}, "
                   f"à régler avant le {day(due)}.\n\nVeuillez agréer nos salutations distinguées,"
                   f"\nService comptabilité"),
        }
        return text[f.lang]
    raise ValueError(f"unknown layout family {family!r}; known: {', '.join(FAMILIES)}")
