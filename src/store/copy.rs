//! New rows written with `COPY ... FROM STDIN (FORMAT BINARY)`, the
//! flusher's fast path for rows that are new in the common case (ledger
//! rows, reservations made in the batch).
//!
//! `COPY` costs Postgres about half of what `INSERT ... SELECT FROM UNNEST
//! ... ON CONFLICT` does per row (no arrays to unpack, no speculative
//! insertion; docs/benchmarks.md, sixth session), but it has no `ON
//! CONFLICT`: one row that exists already fails the whole `COPY`. So it
//! runs in a savepoint, and a unique violation (a replayed batch, a fork,
//! a row another instance made first) rolls back to it and tells the
//! caller to write the same rows through its idempotent statement, which
//! handles every case. The result is the same either way; only the cost
//! differs.

use std::borrow::Cow;

use sqlx::PgConnection;

/// Postgres's `unique_violation`.
const UNIQUE_VIOLATION: &str = "23505";

/// Microseconds from the Unix epoch to Postgres's (2000-01-01 UTC).
const POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;

/// Rows in the binary `COPY` format: a signature and header, then per row
/// its field count and each field as a length and its bytes in the type's
/// binary form (-1 for NULL), then a trailer.
pub(super) struct BinaryRows {
    buf: Vec<u8>,
    columns: i16,
    /// Fields written in the current row, to catch a row of the wrong width
    /// in tests rather than as a Postgres error.
    fields: i16,
    rows: usize,
}

impl BinaryRows {
    pub(super) fn new(columns: i16) -> Self {
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        // Flags (no OIDs), then the length of the header extension.
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&0i32.to_be_bytes());
        BinaryRows {
            buf,
            columns,
            fields: columns,
            rows: 0,
        }
    }

    pub(super) fn row(&mut self) -> &mut Self {
        debug_assert_eq!(self.fields, self.columns, "the previous row's width");
        self.buf.extend_from_slice(&self.columns.to_be_bytes());
        self.fields = 0;
        self.rows += 1;
        self
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        let len = i32::try_from(bytes.len()).expect("a field under 2 GiB");
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(bytes);
        self.fields += 1;
        self
    }

    fn null(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        self.fields += 1;
        self
    }

    pub(super) fn text(&mut self, value: &str) -> &mut Self {
        self.field(value.as_bytes())
    }

    pub(super) fn opt_text(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            Some(v) => self.text(v),
            None => self.null(),
        }
    }

    pub(super) fn int8(&mut self, value: i64) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    pub(super) fn int4(&mut self, value: i32) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    /// A `timestamptz` from Unix milliseconds (what `to_timestamp(ms /
    /// 1000.0)` gives for the same value).
    pub(super) fn timestamp_ms(&mut self, unix_ms: i64) -> &mut Self {
        self.field(&(unix_ms * 1000 - POSTGRES_EPOCH_US).to_be_bytes())
    }

    pub(super) fn opt_timestamp_ms(&mut self, unix_ms: Option<i64>) -> &mut Self {
        match unix_ms {
            Some(ms) => self.timestamp_ms(ms),
            None => self.null(),
        }
    }

    /// A `jsonb` from JSON text: version 1 of the format is the text itself.
    pub(super) fn jsonb(&mut self, json: &str) -> &mut Self {
        let len = i32::try_from(json.len() + 1).expect("a field under 2 GiB");
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.push(1);
        self.buf.extend_from_slice(json.as_bytes());
        self.fields += 1;
        self
    }

    pub(super) fn is_empty(&self) -> bool {
        self.rows == 0
    }

    fn finish(mut self) -> Vec<u8> {
        debug_assert_eq!(self.fields, self.columns, "the last row's width");
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// Copies `rows` with `statement` (`COPY table (columns) FROM STDIN (FORMAT
/// BINARY)`) inside the caller's transaction (it needs one: the savepoint). `Ok(false)` when a row
/// existed already: nothing was written, the transaction goes on, and the
/// caller writes the rows its idempotent way.
pub(super) async fn copy_new_rows(
    tx: &mut PgConnection,
    statement: &str,
    rows: BinaryRows,
) -> Result<bool, sqlx::Error> {
    if rows.is_empty() {
        return Ok(true);
    }
    sqlx::raw_sql("SAVEPOINT copy_new_rows")
        .execute(&mut *tx)
        .await?;
    let copied = async {
        let mut copy = tx.copy_in_raw(statement).await?;
        copy.send(rows.finish()).await?;
        copy.finish().await
    }
    .await;
    match copied {
        Ok(_) => {
            sqlx::raw_sql("RELEASE SAVEPOINT copy_new_rows")
                .execute(&mut *tx)
                .await?;
            Ok(true)
        }
        Err(sqlx::Error::Database(err)) if err.code() == Some(Cow::Borrowed(UNIQUE_VIOLATION)) => {
            // Expected after a replayed batch or a fork; many of them mean
            // the fast path is not taken (and Postgres works harder).
            let table = statement
                .split_whitespace()
                .nth(1)
                .unwrap_or("?")
                .to_owned();
            metrics::counter!("stockd_flush_copy_fallbacks_total", "table" => table).increment(1);
            tracing::debug!(error = %err, "a copied row existed already; writing the rows idempotently");
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT copy_new_rows; RELEASE SAVEPOINT copy_new_rows")
                .execute(&mut *tx)
                .await?;
            Ok(false)
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use sqlx::{PgPool, Row};

    use super::*;

    const COPY: &str = "COPY copied (t, n, i, at, j) FROM STDIN (FORMAT BINARY)";

    async fn table(pool: &PgPool) {
        sqlx::raw_sql(
            "CREATE TABLE copied (t text PRIMARY KEY, n bigint, i integer, at timestamptz, j jsonb)",
        )
        .execute(pool)
        .await
        .unwrap();
    }

    fn rows(keys: &[&str]) -> BinaryRows {
        let mut rows = BinaryRows::new(5);
        for (k, key) in keys.iter().enumerate() {
            let i = k as i32;
            rows.row()
                .text(key)
                .int8(-(1 << 40) - i as i64)
                .int4(i)
                .opt_timestamp_ms((i > 0).then_some(1_700_000_000_123 + i as i64))
                .jsonb(r#"[["sku é", "default", 3]]"#);
        }
        rows
    }

    #[sqlx::test]
    async fn binary_rows_read_back_as_written(pool: PgPool) {
        table(&pool).await;
        let mut tx = pool.begin().await.unwrap();
        assert!(
            copy_new_rows(&mut tx, COPY, rows(&["a\tb\n", "ç"]))
                .await
                .unwrap()
        );
        tx.commit().await.unwrap();
        let read: Vec<String> = sqlx::query(
            "SELECT format('%s|%s|%s|%s|%s', t, n, i,
                           (extract(epoch FROM at) * 1000)::bigint, j) AS r
             FROM copied ORDER BY i",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("r"))
        .collect();
        assert_eq!(
            read,
            vec![
                "a\tb\n|-1099511627776|0||[[\"sku é\", \"default\", 3]]".to_owned(),
                "ç|-1099511627777|1|1700000000124|[[\"sku é\", \"default\", 3]]".to_owned(),
            ]
        );
        // The same instant as the flusher's statements compute.
        let same: bool = sqlx::query_scalar(
            "SELECT at = to_timestamp(1700000000124 / 1000.0) FROM copied WHERE i = 1",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(same);
    }

    #[sqlx::test]
    async fn a_row_that_exists_rolls_the_copy_back_and_the_transaction_goes_on(pool: PgPool) {
        table(&pool).await;
        let mut tx = pool.begin().await.unwrap();
        assert!(copy_new_rows(&mut tx, COPY, rows(&["a"])).await.unwrap());
        // "b" is new but "a" is not: none of the second copy is written.
        assert!(
            !copy_new_rows(&mut tx, COPY, rows(&["b", "a"]))
                .await
                .unwrap()
        );
        sqlx::query("INSERT INTO copied (t) VALUES ('c')")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let keys: Vec<String> = sqlx::query_scalar("SELECT t FROM copied ORDER BY t")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(keys, vec!["a", "c"]);
    }

    #[sqlx::test]
    async fn another_failure_is_an_error(pool: PgPool) {
        table(&pool).await;
        sqlx::raw_sql("ALTER TABLE copied ADD CHECK (n > 0)")
            .execute(&pool)
            .await
            .unwrap();
        let mut tx = pool.begin().await.unwrap();
        let err = copy_new_rows(&mut tx, COPY, rows(&["a"]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("check"), "{err}");
    }
}
