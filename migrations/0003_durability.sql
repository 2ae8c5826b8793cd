-- What a retry needs after Redis lost its data or rolled back (README
-- "Durability"): request outcomes and reservations' fingerprints and
-- outcomes, flushed with the change in the same transaction; the
-- deployment's partition count; and ledger forks, never dropped silently.

-- The deployment's fixed facts, e.g. ('partitions', '16'): checked at start
-- even when Redis is empty.
CREATE TABLE deployment (
    name  text PRIMARY KEY,
    value text NOT NULL
);

-- The outcome of a decrement, adjust or set, per partition of its items:
-- the levels after the change. A retry whose record Redis lost replays it.
CREATE TABLE request_outcomes (
    request_id  text        NOT NULL,
    partition   integer     NOT NULL,
    fingerprint text        NOT NULL,
    op          text        NOT NULL CHECK (op IN ('decrement', 'adjust', 'set')),
    -- JSON array of [sku, location, available, reserved, version].
    levels      jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (request_id, partition)
);
CREATE INDEX request_outcomes_created ON request_outcomes (created_at);

-- A reservation's request fingerprint and the levels its reserve and its
-- end left (the outcomes a replay answers with).
ALTER TABLE reservations
    ADD COLUMN fingerprint    text,
    ADD COLUMN reserve_levels jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN finish_levels  jsonb NOT NULL DEFAULT '[]';
CREATE INDEX reservations_updated ON reservations (updated_at);

-- A change that met another change under the same (sku, location, version)
-- in the ledger: Redis gave out a version Postgres already had (a rollback
-- noticed too late). The entry is dead-lettered, the fork recorded here
-- until an operator resolves it; reconcile never repairs such an item from
-- Postgres while it is open.
CREATE TABLE ledger_forks (
    id          bigserial   PRIMARY KEY,
    sku         text        NOT NULL,
    location    text        NOT NULL,
    version     bigint      NOT NULL,
    partition   integer     NOT NULL,
    entry_id    text        NOT NULL,
    -- The change that lost, as the stream held it.
    op          text        NOT NULL,
    d_available bigint      NOT NULL,
    d_reserved  bigint      NOT NULL,
    available   bigint      NOT NULL,
    reserved    bigint      NOT NULL,
    ref         text        NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    UNIQUE (partition, entry_id)
);
CREATE INDEX ledger_forks_open ON ledger_forks (sku, location) WHERE resolved_at IS NULL;
