"""Prepaid credit per API key: a journal of credit, debits from the usage ledger, a refusal at zero.

A key may hold a balance in the currency of the models' prices (no journal entry: unlimited, as keys always were).
Admins give a key credit at creation and top it up or adjust it later; every change is a journal row (who, when,
amount, note, the balance it left). A served request of a prepaid key is debited its model's price times its
usage row in the same transaction as that row (serve_app/accounts/ledger.py's writer), so the balance (credited - used:
the journal's sum minus the debits) and the ledger can never disagree.

Modules:
    amounts.py  exact decimals: parsing, the stored 10^-12 units, the column type
    book.py     the tables' reads and writes (journal, debits, running sums, summaries, audit)
    guard.py    the gateway's side: the balances it admits by, refreshed with the keys, and the ledger hook

On the request path the balance check is a dict lookup: each gateway replica reloads the balances with the keys
(every auth.key_refresh_s, and when an unknown key arrives) and learns every key's running sums again each time
one of its own commits debits that key. The keys a replica knows as prepaid are the ones its commits debit, so
rows of unlimited keys cost the commit nothing; a key that had no balance and is topped up becomes prepaid on a
replica at its next reload (a key created with credit is loaded with its balance). A key at or below zero is refused (429 insufficient_quota) before any
model is called. A request admitted with a positive balance is served in full, so a balance can end below zero by
what was in flight: the requests already admitted when it reached zero, plus those another replica admitted before
it heard (at its next commit for that key or its next reload).
"""
