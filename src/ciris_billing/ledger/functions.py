"""The consumption rule's SQL functions, as the database holds them (migration 20261207_lots).

The rule has two halves. The ORDER of an account's lots (ledger/rules.py, `consumption_key`)
is kept in the account row's wallet arrays (`lot_ids`, `lot_left`, `lot_kinds`, `lot_expires`):
whoever adds or removes a lot writes the wallet back in that order, under the account's lock.
The WALK is `ledger_walk`: from the wallet's first lot to its last, skipping lots expired at
the statement's time, take until the uses are taken. Every hot statement (charge, hold, their
batched twins) applies the walk to the locked account row itself, so it needs no other row and
no second snapshot: the UPDATE's re-check of a concurrently changed row (EvalPlanQual) sees the
new wallet, and the walk is computed from it. That is why the wallet lives on the account row.

tests/ledger/test_rules.py checks that the database's functions are exactly these texts.
"""

from __future__ import annotations

# THE WALK. From the wallet's first slot to its last, skipping lots expired at p_at
# (expires_at <= p_at: unusable from that instant; p_expires NULL: nothing expires, as for the
# lots a hold already took), take until p_uses are taken: `taken` per slot, `new_left` what
# stays, and how many of the taken were free (kind 0) and not free. All NULL when the usable
# lots hold fewer than p_uses (the statements' WHERE clause has refused that already, by
# ledger_available or the counters). Never more than a lot's left: no lot goes below 0.
LEDGER_WALK = """
DECLARE
    slots integer := coalesce(cardinality(p_left), 0);
    need bigint := p_uses;
    part bigint;
BEGIN
    new_left := p_left;
    taken := array_fill(0::bigint, ARRAY[slots]);
    free_taken := 0;
    other_taken := 0;
    FOR i IN 1 .. slots LOOP
        EXIT WHEN need <= 0;
        IF p_left[i] > 0 AND (p_expires IS NULL OR p_expires[i] IS NULL OR p_expires[i] > p_at)
        THEN
            part := LEAST(p_left[i], need);
            taken[i] := part;
            new_left[i] := p_left[i] - part;
            need := need - part;
            IF p_kinds[i] = 0 THEN
                free_taken := free_taken + part;
            ELSE
                other_taken := other_taken + part;
            END IF;
        END IF;
    END LOOP;
    IF need > 0 THEN
        new_left := NULL;
        taken := NULL;
        free_taken := NULL;
        other_taken := NULL;
    END IF;
END
"""

# THE WALK ON THE WALLET, as the hot statements apply it to the locked account row: the walk
# above, answering with only the lots it touched (their ids, kinds and the uses taken from each,
# in the wallet's order) instead of a take per slot, so the statement's RETURNING needs no
# further call. Its common case, one lot giving all the uses, returns at once.
# tests/ledger/test_rules.py checks it against ledger_walk over random wallets.
LEDGER_TAKE = """
DECLARE
    slots integer := coalesce(cardinality(p_left), 0);
    need bigint := p_uses;
    part bigint;
    l bigint;
BEGIN
    free_taken := 0;
    other_taken := 0;
    FOR i IN 1 .. slots LOOP
        l := p_left[i];
        CONTINUE WHEN l = 0 OR p_expires[i] <= p_at;
        part := LEAST(l, need);
        IF ids IS NULL THEN
            IF part = need THEN
                new_left := p_left[1 : i - 1] || (l - part) || p_left[i + 1 :];
                ids := ARRAY[p_ids[i]];
                kinds := ARRAY[p_kinds[i]];
                taken := ARRAY[part];
                IF p_kinds[i] = 0 THEN
                    free_taken := part;
                ELSE
                    other_taken := part;
                END IF;
                RETURN;
            END IF;
            new_left := p_left;
            ids := ARRAY[p_ids[i]];
            kinds := ARRAY[p_kinds[i]];
            taken := ARRAY[part];
        ELSE
            ids := ids || p_ids[i];
            kinds := kinds || p_kinds[i];
            taken := taken || part;
        END IF;
        new_left[i] := l - part;
        need := need - part;
        IF p_kinds[i] = 0 THEN
            free_taken := free_taken + part;
        ELSE
            other_taken := other_taken + part;
        END IF;
        EXIT WHEN need = 0;
    END LOOP;
    IF need > 0 OR ids IS NULL THEN
        new_left := NULL;
        ids := NULL;
        kinds := NULL;
        taken := NULL;
        free_taken := NULL;
        other_taken := NULL;
    END IF;
END
"""

# The uses the wallet's unexpired lots of one side give at p_at: the free lots' (p_free) or
# all the others'. What a movement reports as left past next_expiry_at (statements.py).
LEDGER_USABLE = """
DECLARE
    total bigint := 0;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_left), 0) LOOP
        IF (p_kinds[i] = 0) = p_free AND (p_expires[i] IS NULL OR p_expires[i] > p_at) THEN
            total := total + p_left[i];
        END IF;
    END LOOP;
    RETURN total;
END
"""

# The uses the wallet's lots can give at p_at (expired lots give none).
LEDGER_AVAILABLE = """
DECLARE
    total bigint := 0;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_left), 0) LOOP
        IF p_expires[i] IS NULL OR p_expires[i] > p_at THEN
            total := total + p_left[i];
        END IF;
    END LOOP;
    RETURN total;
END
"""

# p_left with p_uses of lot p_ids[k] added back to its slot (a hold's uses returned to the
# lots they came from). A lot not in the wallet is an error: lots leave the wallet only when
# nothing is left in them and no open hold names them (ledger/wallet.py).
LEDGER_GIVE_BACK = """
DECLARE
    result bigint[] := p_left;
    slot integer;
BEGIN
    FOR k IN 1 .. coalesce(cardinality(p_ids), 0) LOOP
        CONTINUE WHEN p_uses[k] = 0;
        slot := array_position(p_wallet_ids, p_ids[k]);
        IF slot IS NULL THEN
            RAISE EXCEPTION 'lot % is not in the wallet', p_ids[k] USING ERRCODE = 'P0001';
        END IF;
        result[slot] := result[slot] + p_uses[k];
    END LOOP;
    RETURN result;
END
"""

# The elements of p_ids (lot ids, or their kinds) at the slots where p_uses is not 0: a
# movement records only the lots it touched.
LEDGER_TOUCHED = """
DECLARE
    result p_ids%TYPE := p_ids[1:0];
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_ids), 0) LOOP
        IF p_uses[i] <> 0 THEN
            result := result || p_ids[i];
        END IF;
    END LOOP;
    RETURN result;
END
"""

# Slot by slot: p_a[i] - p_b[i] (what comes back of a hold's lots after owed uses were paid
# off from them, capture_statements.py); with p_free_zero, p_a[i] where p_b[i] (a kind) is not
# free, else 0 (the paid uses coming back). Functions, not ARRAY(SELECT ... unnest ...): a
# subquery is set up on every run of the statement even when its branch is not taken.
LEDGER_SLOTWISE = """
DECLARE
    result bigint[] := p_a;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_a), 0) LOOP
        IF p_free_zero THEN
            IF p_b[i] = 0 THEN
                result[i] := 0;
            END IF;
        ELSE
            result[i] := p_a[i] - p_b[i];
        END IF;
    END LOOP;
    RETURN result;
END
"""

# name, arguments (OUT ones included), return type, body: as the migration creates them.
FUNCTIONS: tuple[tuple[str, str, str, str], ...] = (
    (
        "ledger_walk",
        "p_left bigint[], p_kinds smallint[], p_expires timestamptz[], p_uses bigint, "
        "p_at timestamptz, OUT new_left bigint[], OUT taken bigint[], OUT free_taken bigint, "
        "OUT other_taken bigint",
        "record",
        LEDGER_WALK,
    ),
    (
        "ledger_available",
        "p_left bigint[], p_expires timestamptz[], p_at timestamptz",
        "bigint",
        LEDGER_AVAILABLE,
    ),
    (
        "ledger_give_back",
        "p_wallet_ids varchar[], p_left bigint[], p_ids varchar[], p_uses bigint[]",
        "bigint[]",
        LEDGER_GIVE_BACK,
    ),
    (
        "ledger_touched",
        "p_ids anycompatiblearray, p_uses bigint[]",
        "anycompatiblearray",
        LEDGER_TOUCHED,
    ),
    (
        "ledger_take",
        "p_ids varchar[], p_left bigint[], p_kinds smallint[], p_expires timestamptz[], "
        "p_uses bigint, p_at timestamptz, OUT new_left bigint[], OUT ids varchar[], "
        "OUT kinds smallint[], OUT taken bigint[], OUT free_taken bigint, "
        "OUT other_taken bigint",
        "record",
        LEDGER_TAKE,
    ),
    (
        "ledger_usable",
        "p_left bigint[], p_kinds smallint[], p_expires timestamptz[], p_at timestamptz, "
        "p_free boolean",
        "bigint",
        LEDGER_USABLE,
    ),
    (
        "ledger_slotwise",
        "p_a bigint[], p_b bigint[], p_free_zero boolean",
        "bigint[]",
        LEDGER_SLOTWISE,
    ),
)


def create_statements() -> list[str]:
    """CREATE OR REPLACE for each function: IMMUTABLE (a function of its arguments only), so
    the planner may fold and cache it; PARALLEL SAFE."""
    return [
        f"CREATE OR REPLACE FUNCTION {name}({arguments}) RETURNS {returns} "
        f"LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn${body}$fn$"
        for name, arguments, returns, body in FUNCTIONS
    ]
