//! One way to run the read queries on either ledger backend, so each query
//! in [`super::query`] is written once.
//!
//! Queries are portable SQL: numbered `?N` placeholders (SQLite's own
//! syntax, turned into `$N` for PostgreSQL), integers only (`BIGINT` in
//! PostgreSQL, where `SUM` of a `BIGINT` is `NUMERIC`: portable queries wrap
//! every `SUM` in `CAST(… AS BIGINT)`), flags as 0/1 integers compared with
//! `<> 0`, and no bare columns next to aggregates. Parameters carry their
//! type ([`Param`]) so PostgreSQL never has to infer one from `?1 IS NULL`.
//! Rows come back as owned values ([`Row`]) on both backends.
//!
//! SQLite statements run on the blocking pool (one connection, reads are
//! short); PostgreSQL statements run on the async pool without blocking a
//! runtime thread.

use std::sync::{Arc, Mutex};

use super::LedgerError;
use crate::money::Money;

/// A typed query parameter (`None`: SQL NULL of that type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    Int(Option<i64>),
    Text(Option<String>),
}

impl Param {
    /// An unsigned figure, clamped into `BIGINT`.
    pub fn uint(value: u64) -> Param {
        Param::Int(Some(clamp(value)))
    }

    pub fn text(value: &str) -> Param {
        Param::Text(Some(value.to_string()))
    }
}

/// `value` as a `BIGINT` (saturating: no ledger figure gets near it).
pub fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// One column value of a result row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

/// One result row, read by column index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn value(&self, i: usize) -> Result<&Value, LedgerError> {
        self.0
            .get(i)
            .ok_or_else(|| LedgerError::Query(format!("no column {i} in the result")))
    }

    fn mismatch(&self, i: usize, wanted: &str) -> LedgerError {
        LedgerError::Query(format!(
            "column {i}: expected {wanted}, got {:?}",
            self.0.get(i)
        ))
    }

    /// An integer column, `None` for NULL.
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, LedgerError> {
        match self.value(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            Value::Text(_) => Err(self.mismatch(i, "an integer")),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64, LedgerError> {
        self.opt_int(i)?
            .ok_or_else(|| self.mismatch(i, "an integer"))
    }

    /// A count or sum: NULL (an empty sum) is 0, a negative value is 0.
    pub fn uint(&self, i: usize) -> Result<u64, LedgerError> {
        Ok(self.opt_int(i)?.unwrap_or(0).max(0) as u64)
    }

    pub fn opt_uint(&self, i: usize) -> Result<Option<u64>, LedgerError> {
        Ok(self.opt_int(i)?.map(|v| v.max(0) as u64))
    }

    pub fn money(&self, i: usize) -> Result<Money, LedgerError> {
        self.uint(i).map(Money::from_picos)
    }

    pub fn flag(&self, i: usize) -> Result<bool, LedgerError> {
        Ok(self.opt_int(i)?.is_some_and(|v| v != 0))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, LedgerError> {
        match self.value(i)? {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            Value::Int(_) => Err(self.mismatch(i, "text")),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, LedgerError> {
        self.opt_text(i)?.ok_or_else(|| self.mismatch(i, "text"))
    }
}

/// Where read queries run.
#[derive(Clone)]
pub enum Reader {
    /// The SQLite reader connection (WAL: reads while the writer writes).
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
    /// The PostgreSQL connection pool.
    Postgres(deadpool_postgres::Pool),
}

impl Reader {
    /// Every row of `sql` with `params`.
    pub async fn rows(&self, sql: &str, params: Vec<Param>) -> Result<Vec<Row>, LedgerError> {
        match self {
            Reader::Sqlite(conn) => {
                let conn = conn.clone();
                let sql = sql.to_string();
                tokio::task::spawn_blocking(move || {
                    super::sqlite::rows(&super::lock(&conn), &sql, &params)
                })
                .await
                .map_err(|e| LedgerError::Query(format!("query task failed: {e}")))?
            }
            Reader::Postgres(pool) => super::postgres::rows(pool, sql, &params).await,
        }
    }

    /// The one row of an aggregate query.
    pub async fn row(&self, sql: &str, params: Vec<Param>) -> Result<Row, LedgerError> {
        self.rows(sql, params)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| LedgerError::Query("the query returned no row".into()))
    }
}

/// `?N` placeholders as PostgreSQL's `$N` (portable queries hold no `?`
/// inside string literals).
pub fn postgres_placeholders(sql: &str) -> String {
    sql.replace('?', "$")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_alike() {
        assert_eq!(
            postgres_placeholders("SELECT a FROM t WHERE b = ?1 AND (?2 IS NULL OR c = ?2)"),
            "SELECT a FROM t WHERE b = $1 AND ($2 IS NULL OR c = $2)"
        );
    }

    #[test]
    fn rows_read_nulls_as_zero_sums_and_refuse_wrong_types() {
        let row = Row(vec![Value::Null, Value::Int(-3), Value::Text("x".into())]);
        assert_eq!(row.uint(0).unwrap(), 0);
        assert_eq!(row.uint(1).unwrap(), 0);
        assert_eq!(row.opt_text(0).unwrap(), None);
        assert!(row.int(2).is_err());
        assert!(row.text(1).is_err());
        assert!(row.int(3).is_err());
    }
}
