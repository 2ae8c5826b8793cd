-- Webhooks (README "Webhooks", docs/design.md "Webhooks"): subscriptions, and
-- the outbox of deliveries the detector writes from the partition streams
-- (in the same statement for a whole batch, before it acknowledges the
-- entries) and the dispatcher POSTs.

CREATE TABLE webhook_subscriptions (
    id                  bigserial   PRIMARY KEY,
    url                 text        NOT NULL,
    -- Any of out_of_stock, back_in_stock, low_stock.
    events              text[]      NOT NULL
        CHECK (cardinality(events) > 0
               AND events <@ ARRAY['out_of_stock', 'back_in_stock', 'low_stock']),
    -- low_stock fires when `available` falls from >= threshold to below it.
    low_stock_threshold bigint      CHECK (low_stock_threshold >= 1),
    -- NULL: every SKU.
    skus                text[],
    -- NULL: the server-wide secret (STOCKD_WEBHOOK_SECRET).
    secret              text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (low_stock_threshold IS NOT NULL OR NOT ('low_stock' = ANY (events)))
);

-- One row per (subscription, transition). The unique key makes the
-- detector's replays (a crash between its commit and its XACK) harmless, and
-- is the idempotency key a receiver sees.
CREATE TABLE webhook_deliveries (
    id              bigserial   PRIMARY KEY,
    subscription_id bigint      NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    sku             text        NOT NULL,
    location        text        NOT NULL,
    version         bigint      NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('out_of_stock', 'back_in_stock', 'low_stock')),
    idempotency_key text        NOT NULL,
    payload         jsonb       NOT NULL,
    -- pending: queued or being retried; delivered; dead: parked after the
    -- last allowed attempt (the dead-letter table is the view below).
    state           text        NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- An instance sending this delivery holds it until then.
    leased_until    timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    dead_at         timestamptz,
    UNIQUE (subscription_id, sku, location, version, kind)
);

-- The dispatcher's question: the oldest pending delivery of each
-- (subscription, item).
CREATE INDEX webhook_deliveries_pending
    ON webhook_deliveries (subscription_id, sku, location, version, id)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_dead
    ON webhook_deliveries (dead_at DESC)
    WHERE state = 'dead';
CREATE INDEX webhook_deliveries_delivered
    ON webhook_deliveries (delivered_at)
    WHERE state = 'delivered';

-- The dead letters: deliveries that failed every allowed attempt.
-- `stockctl webhook redeliver ID` queues one again.
CREATE VIEW webhook_dead_letters AS
    SELECT id, subscription_id, sku, location, version, kind, idempotency_key,
           payload, attempts, last_error, created_at, dead_at
    FROM webhook_deliveries
    WHERE state = 'dead';
