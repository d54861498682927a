"""A small multilingual corpus with questions whose answers lie in known documents."""

DOCUMENTS = {
    "en/lease.md": "# Office lease\n\nThe lease of the office at 12 Harbour Street runs until 31 March 2027. "
                   "The monthly rent is 2,400 EUR, payable on the first working day of each month. "
                   "Either party may terminate with six months' written notice.",
    "en/cleaning.md": "# Cleaning services\n\nSparkle Cleaning cleans the premises every Tuesday and Friday "
                      "evening. If a visit is missed, the customer may withhold payment for that week.",
    "en/pump.md": "# Warranty for the water pump\n\nThe supplier warrants the pump for 24 months from delivery. "
                  "A defective pump is repaired or replaced free of charge within ten working days.",
    "en/retention.md": "# Record retention\n\nInvoices, receipts and contracts are kept for ten years "
                       "in the archive room, then shredded by a certified company.",
    "en/clinic.md": "# Patient records\n\nOnly the treating physician and the head nurse may open a patient's "
                    "file. Access is logged and reviewed every quarter by the data protection officer.",
    "en/liability.md": "# Liability\n\nLiability for late delivery is limited to five percent of the order "
                       "value. Neither party is liable for events of force majeure such as floods.",
    "en/it.md": "# IT support\n\nThe helpdesk answers on weekdays from 8:00 to 18:00. Password resets are "
                "handled within one hour; hardware failures within two business days.",
    "en/travel.md": "# Travel policy\n\nEmployees travel by train for trips under 500 km. Hotel costs are "
                    "reimbursed up to 120 EUR per night with a receipt.",
    "fr/bail.md": "# Bail commercial\n\nLe bail du local de la rue Victor Hugo prend fin le 30 juin 2028. "
                  "Le loyer trimestriel s'élève à 5 100 euros, payable d'avance.",
    "fr/maintenance.md": "# Contrat de maintenance\n\nLe technicien intervient sous quarante-huit heures en cas de "
                         "panne de la chaudière. L'entretien annuel a lieu chaque automne.",
    "fr/factures.md": "# Paiement des factures\n\nLes factures sont payées à quarante-cinq jours fin de mois. "
                      "Tout retard entraîne une pénalité de dix pour cent.",
    "fr/conges.md": "# Congés\n\nLes salariés disposent de vingt-cinq jours de congés payés par an, à poser "
                    "avant le 31 mai de l'année suivante.",
    "fr/securite.md": "# Sécurité incendie\n\nLes extincteurs sont vérifiés chaque année en janvier. "
                      "L'exercice d'évacuation a lieu deux fois par an.",
    "fr/dossier.md": "# Dossier médical\n\nLe dossier médical est conservé vingt ans après la dernière "
                     "consultation du patient.",
    "es/alquiler.md": "# Contrato de alquiler\n\nEl alquiler del almacén de Valencia cuesta 1.800 euros al mes "
                      "y el contrato vence el 15 de septiembre de 2026.",
    "es/proveedor.md": "# Proveedor de piezas\n\nFerretería López entrega las piezas en un plazo de tres días "
                       "laborables. Los pedidos urgentes llevan un recargo del ocho por ciento.",
    "es/garantia.md": "# Garantía\n\nLos compresores tienen una garantía de tres años. La garantía no cubre "
                      "los daños causados por un uso indebido.",
    "es/vacaciones.md": "# Vacaciones\n\nCada empleado tiene derecho a veintidós días laborables de vacaciones "
                        "al año, que deben solicitarse con un mes de antelación.",
    "es/facturacion.md": "# Facturación\n\nLas facturas se emiten el último día del mes y se pagan por "
                         "transferencia bancaria en un plazo de sesenta días.",
    "es/privacidad.md": "# Privacidad\n\nLos datos de los clientes se guardan en servidores propios en Madrid "
                        "y nunca se envían a terceros sin consentimiento.",
}

QUESTIONS = [
    ("When does the office lease end?", "en/lease.md"),
    ("How much is the monthly rent for the office?", "en/lease.md"),
    ("On which days is the office cleaned?", "en/cleaning.md"),
    ("How long is the pump under warranty?", "en/pump.md"),
    ("How many years are invoices kept?", "en/retention.md"),
    ("Who may open a patient's file?", "en/clinic.md"),
    ("What is the cap on liability for late delivery?", "en/liability.md"),
    ("When is the IT helpdesk open?", "en/it.md"),
    ("What is the hotel limit per night?", "en/travel.md"),
    ("Quand le bail de la rue Victor Hugo prend-il fin ?", "fr/bail.md"),
    ("En combien de temps le technicien intervient-il en cas de panne de chaudière ?", "fr/maintenance.md"),
    ("Quelle pénalité en cas de retard de paiement des factures ?", "fr/factures.md"),
    ("Combien de jours de congés payés par an ?", "fr/conges.md"),
    ("Quand les extincteurs sont-ils vérifiés ?", "fr/securite.md"),
    ("Combien de temps le dossier médical est-il conservé ?", "fr/dossier.md"),
    ("¿Cuánto cuesta el alquiler del almacén de Valencia?", "es/alquiler.md"),
    ("¿En qué plazo entrega las piezas Ferretería López?", "es/proveedor.md"),
    ("¿Cuántos años de garantía tienen los compresores?", "es/garantia.md"),
    ("¿Cuántos días de vacaciones tiene cada empleado?", "es/vacaciones.md"),
    ("¿En qué plazo se pagan las facturas?", "es/facturacion.md"),
    ("¿Dónde se guardan los datos de los clientes?", "es/privacidad.md"),
]
