"""Exact amounts of credit: decimals in, integers of 10^-12 stored, decimals out. No binary float anywhere.

Amounts are in the currency of the models' prices (`price: {per_1k_documents}` / `{per_1m_tokens}`). They are
stored as whole numbers of 10^-12 currency units ("picos"), which makes every sum in SQL exact on both SQLite
(64-bit INTEGER) and PostgreSQL (NUMERIC(38, 0)). The resolution covers every price a config may hold: a price per
1M tokens with up to 6 decimals costs a whole number of picos per token, one per 1,000 documents with up to 9
decimals a whole number per document (serve_app/config.py checks prices against these limits), so a request's
cost is exact and no rounding happens anywhere.

SQLite's 64-bit integers bound a key's running sums to about 9.2 million; PostgreSQL has no such bound. A single
credit entry is limited to MAX_ENTRY either way (a typo guard, and far inside both).
"""

from __future__ import annotations

from decimal import Decimal, DecimalException, InvalidOperation, localcontext
from typing import Any

from sqlalchemy import BigInteger, Numeric
from sqlalchemy.types import TypeDecorator

from serve_app.config import EXACT

DECIMAL_PLACES = 12
MAX_ENTRY = Decimal(1_000_000)
SQLITE_MAX_TOTAL = Decimal(9_000_000)  # below 2^63 picos, with room for the debits of requests in flight


class InvalidAmount(ValueError):
    pass


def parse_amount(value: Any, *, allow_negative: bool = False, allow_zero: bool = False) -> Decimal:
    """A credit amount from a client or the command line: a decimal string ("25", "2.50") or an exact number
    (int, Decimal; JSON numbers reach the admin routes as Decimal). Booleans and floats are refused: a float has
    already lost the digits the caller typed."""
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise InvalidAmount(f"an amount must be a decimal number such as 25 or 2.50, not {value!r}")
    try:
        amount = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except InvalidOperation:
        raise InvalidAmount(f"an amount must be a decimal number such as 25 or 2.50, not {value!r}") from None
    if not amount.is_finite():
        raise InvalidAmount(f"an amount must be a finite decimal number, not {value!r}")
    if amount < 0 and not allow_negative:
        raise InvalidAmount(f"the amount must not be negative ({value!r}); a top-up adds credit (a downward "
                            "correction is an adjustment)")
    if amount == 0 and not allow_zero:
        raise InvalidAmount("the amount must not be zero: an entry that changes nothing is not recorded")
    if abs(amount) > MAX_ENTRY:
        raise InvalidAmount(f"one credit entry is at most {MAX_ENTRY} in absolute value, not {value!r}; split "
                            "larger amounts into several entries")
    to_units(amount)  # at most DECIMAL_PLACES decimals, or InvalidAmount
    return amount + 0  # + 0 turns -0 into 0


def to_units(amount: Decimal | int) -> int:
    try:
        with localcontext(EXACT):
            units = Decimal(amount).scaleb(DECIMAL_PLACES)
            exact = units == units.to_integral_value()
    except DecimalException:  # more digits than EXACT holds: far past any amount allowed
        exact = False
    if not exact:
        raise InvalidAmount(f"an amount has at most {DECIMAL_PLACES} decimal places, not {amount}")
    return int(units)


def from_units(units: int | Decimal) -> Decimal:
    return Decimal(units).scaleb(-DECIMAL_PLACES)


def decimal_text(amount: Decimal) -> str:
    """The exact amount as plain decimal text ("12.5", "-0.00000002", "0"): no exponent, no trailing zeros."""
    text = f"{amount.normalize():f}"
    return "0" if text in ("-0", "0") else text


class CreditAmount(TypeDecorator):
    """A Decimal in Python, a whole number of 10^-12 units in the database (BIGINT on SQLite, NUMERIC(38, 0) on
    PostgreSQL, so that SUM never overflows there). Sums and arithmetic in SQL keep this type."""

    impl = BigInteger
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "postgresql":
            return dialect.type_descriptor(Numeric(38, 0))
        return dialect.type_descriptor(BigInteger())

    def process_bind_param(self, value, dialect):
        return None if value is None else to_units(value)

    def process_result_value(self, value, dialect):
        return None if value is None else from_units(value)

    def coerce_compared_value(self, op, value):
        return self  # `column + Decimal(...)` binds the Decimal as units too
