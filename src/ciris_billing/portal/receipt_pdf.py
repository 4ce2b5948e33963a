"""A purchase's receipt as a PDF (issue 25 item 5), made with fpdf2 (pure Python, well kept).

What it shows: the seller (SELLER_NAME, SELLER_ADDRESS settings), the receipt's number (the
payment's id) and date, what was bought (the pack: its uses), the amount, the discount, the
card's brand and last 4 as the provider reports them, each refund (date and amount) and the
net paid. The pack is named by its uses and, when not the default pack, its pack_id; the
discount is what the purchase's promotion code took off (issue 24).

The PDF's built-in Helvetica covers Latin-1 only: any other character is shown as "?" (a name
in another script needs a Unicode font shipped with the service: not done here).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ciris_billing.checkout.routes import format_price


@dataclass(frozen=True, slots=True)
class Refund:
    at: datetime
    amount_minor: int


@dataclass(frozen=True, slots=True)
class ReceiptFacts:
    seller_name: str
    seller_address: str
    payment_id: str
    paid_at: datetime
    pack: str
    amount_minor: int
    discount_minor: int
    currency: str
    card_brand: str | None
    card_last4: str | None
    refunds: tuple[Refund, ...]


def purchase_pack(purchase: Any) -> str:
    """The pack bought: its uses, and its pack_id when not the default pack."""
    pack_id = getattr(purchase, "pack_id", None)
    named = f" (pack {pack_id})" if pack_id and pack_id != "default" else ""
    return f"{int(purchase.uses)} uses{named}"


def purchase_discount(purchase: Any) -> int:
    """What the purchase's promotion code took off the price, in minor units."""
    return int(getattr(purchase, "discount_minor", 0) or 0)


def _latin1(value: str) -> str:
    return value.encode("latin-1", "replace").decode("latin-1")


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC")


def receipt_pdf(facts: ReceiptFacts) -> bytes:
    """The receipt, one A4 page."""
    # Imported here: fpdf2 (and its fonts) take ~0.3 s to import, paid by every worker at
    # start otherwise; a worker restarted after a crash serves sooner without it.
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_title(_latin1(f"Receipt {facts.payment_id}"))
    pdf.set_author(_latin1(facts.seller_name or "CIRIS Billing"))
    pdf.set_creation_date(facts.paid_at)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 10, _latin1(facts.seller_name or "Receipt"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=10)
    for line in facts.seller_address.replace(" | ", "\n").splitlines():
        pdf.cell(0, 5, _latin1(line), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(6)
    pdf.set_font("Helvetica", "B", 13)
    pdf.cell(0, 8, "Receipt", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=11)

    def money(amount: int) -> str:
        return _latin1(format_price(amount, facts.currency))

    card = (
        f"{facts.card_brand.capitalize()} ending in {facts.card_last4}"
        if facts.card_brand and facts.card_last4
        else "-"
    )
    refunded = sum(refund.amount_minor for refund in facts.refunds)
    rows = [
        ("Receipt number", facts.payment_id),
        ("Date paid", _when(facts.paid_at)),
        ("Pack", facts.pack),
        ("Price", money(facts.amount_minor + facts.discount_minor)),
        ("Discount", money(facts.discount_minor) if facts.discount_minor else "none"),
        ("Amount paid", money(facts.amount_minor)),
        ("Card", card),
    ]
    rows += [
        (f"Refund {_when(refund.at)}", "-" + money(refund.amount_minor)) for refund in facts.refunds
    ]
    if facts.refunds:
        rows.append(("Net paid", money(facts.amount_minor - refunded)))
    for label, value in rows:
        pdf.cell(55, 7, _latin1(label))
        pdf.cell(0, 7, _latin1(value), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
