-- Least privilege for the role stockd runs as, once the schema exists.
--
-- The first start (or an upgrade that brings new migrations) must run as a
-- role that may create tables, e.g. the database owner: stockd creates the
-- database when missing and runs the pending migrations. Afterwards stockd
-- only reads which migrations ran, and reads and writes rows: it never
-- truncates or changes the schema, and deletes only webhook rows (a removed
-- subscription, delivered webhooks past their keep time) and request
-- outcomes older than the idempotency window.
--
--   psql -d stockd -v ON_ERROR_STOP=1 -f deploy/postgres-grants.sql
--
-- then start stockd with STOCKD_DATABASE_URL=postgres://stockd_app:...@host/stockd
-- (set the password with \password stockd_app, or use your own auth method).

CREATE ROLE stockd_app LOGIN;
GRANT CONNECT ON DATABASE stockd TO stockd_app;
GRANT USAGE ON SCHEMA public TO stockd_app;
GRANT SELECT ON _sqlx_migrations TO stockd_app;
GRANT SELECT, INSERT, UPDATE ON stock, stock_ledger, reservations, flush_checkpoint,
    deployment, ledger_forks TO stockd_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON request_outcomes TO stockd_app;
GRANT USAGE ON SEQUENCE ledger_forks_id_seq TO stockd_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_subscriptions, webhook_deliveries TO stockd_app;
GRANT SELECT ON webhook_dead_letters TO stockd_app;
GRANT USAGE ON SEQUENCE webhook_subscriptions_id_seq, webhook_deliveries_id_seq TO stockd_app;
