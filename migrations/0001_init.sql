-- stockd's Postgres schema (DESIGN.md, "Postgres tables"). Postgres is written
-- behind Redis by the flusher: every row here is derived from the partition
-- streams, and every write is idempotent so that a replayed batch is harmless.

-- The latest state of each item; written under a version guard, so an older
-- event can never overwrite a newer state.
CREATE TABLE stock (
    sku        text        NOT NULL,
    location   text        NOT NULL,
    available  bigint      NOT NULL CHECK (available >= 0),
    reserved   bigint      NOT NULL CHECK (reserved >= 0),
    version    bigint      NOT NULL CHECK (version >= 1),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sku, location)
);

-- Every change of every item, once. (sku, location, version) is the identity
-- of a change: stable across Redis restarts, unlike stream entry ids.
CREATE TABLE stock_ledger (
    sku         text        NOT NULL,
    location    text        NOT NULL,
    version     bigint      NOT NULL CHECK (version >= 1),
    op          text        NOT NULL CHECK (op IN ('reserve', 'commit', 'release', 'expire', 'decrement', 'adjust', 'set')),
    d_available bigint      NOT NULL,
    d_reserved  bigint      NOT NULL,
    available   bigint      NOT NULL CHECK (available >= 0),
    reserved    bigint      NOT NULL CHECK (reserved >= 0),
    ref         text        NOT NULL,
    partition   integer     NOT NULL,
    entry_id    text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    PRIMARY KEY (sku, location, version)
);

-- One row per (reservation, partition): each partition's flusher writes the
-- lines of its own partition. `lines` is a JSON array of [sku, location, qty].
CREATE TABLE reservations (
    reservation_id text        NOT NULL,
    partition      integer     NOT NULL,
    state          text        NOT NULL CHECK (state IN ('held', 'committed', 'released', 'expired')),
    lines          jsonb       NOT NULL,
    expires_at     timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reservation_id, partition)
);
CREATE INDEX reservations_held ON reservations (partition) WHERE state = 'held';

-- The newest stream entry each partition has written to Postgres.
CREATE TABLE flush_checkpoint (
    partition     integer     PRIMARY KEY,
    last_entry_id text        NOT NULL,
    flushed_at    timestamptz NOT NULL
);
