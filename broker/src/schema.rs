//! The index the broker's SQLite log needs and Tansu 0.6 does not create.
//!
//! Tansu 0.6's SQLite schema (`tansu-storage` 0.6, `ddl/040-header.sql`) gives the `header`
//! table no index, yet a fetch looks up each record's headers by `(topition, offset_id)`
//! (`sql/header_fetch.sql`), and each record a compaction deletes cascades to its headers by the
//! same columns. Both scan the whole table. Every orderflow record carries headers, so the cost
//! of a fetch grows with the log: measured on a crash test's log of 28,483 records and 46,856
//! headers, 1.8 ms per record fetched, until the broker spent its core scanning and stopped
//! answering within minutes; with the index, 8 µs. [`crate::DurableBroker`] adds the index to
//! the log file before it serves it (`CREATE INDEX IF NOT EXISTS`: once per file, kept across
//! runs; Tansu's own schema statements are `IF NOT EXISTS` too and leave it alone).

use std::{path::Path, time::Duration};

use rusqlite::{Connection, OpenFlags};

use crate::BrokerError;

/// The indexes added, by name.
pub const INDEXES: &[(&str, &str)] = &[(
    "orderflow_header_record",
    "CREATE INDEX IF NOT EXISTS orderflow_header_record ON header (topition, offset_id)",
)];

fn failed(db: &Path, what: &str, source: rusqlite::Error) -> BrokerError {
    BrokerError::Schema {
        db: db.to_owned(),
        what: what.to_owned(),
        source,
    }
}

/// Whether `db` exists and holds Tansu's schema (its `header` table).
pub fn has_schema(db: &Path) -> Result<bool, BrokerError> {
    if !db.exists() {
        return Ok(false);
    }
    let connection = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| failed(db, "opening", e))?;
    connection
        .busy_timeout(Duration::from_secs(30))
        .map_err(|e| failed(db, "setting a busy timeout on", e))?;
    let tables: i64 = connection
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'header'",
            [],
            |row| row.get(0),
        )
        .map_err(|e| failed(db, "reading the schema of", e))?;
    Ok(tables > 0)
}

/// Adds the missing indexes to `db`, which holds Tansu's schema and no running broker.
pub fn add_indexes(db: &Path) -> Result<(), BrokerError> {
    let connection = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| failed(db, "opening", e))?;
    connection
        .busy_timeout(Duration::from_secs(30))
        .map_err(|e| failed(db, "setting a busy timeout on", e))?;
    for (_, statement) in INDEXES {
        connection
            .execute_batch(statement)
            .map_err(|e| failed(db, "indexing", e))?;
    }
    Ok(())
}

/// The names of the indexes `db` holds (for tests).
pub fn indexes(db: &Path) -> Result<Vec<String>, BrokerError> {
    let connection = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| failed(db, "opening", e))?;
    let mut statement = connection
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name")
        .map_err(|e| failed(db, "reading the schema of", e))?;
    let names = statement
        .query_map([], |row| row.get::<_, String>(0))
        .map_err(|e| failed(db, "reading the schema of", e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(db, "reading the schema of", e))?;
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tansu's `header` and `record` tables as its 0.6 DDL creates them, and the fetch of
    /// `sql/header_fetch.sql` reduced to the part that matters: the index turns its scan of
    /// `header` into a search.
    #[test]
    fn the_header_lookup_uses_the_index() {
        let dir = std::env::temp_dir().join(format!("orderflow-schema-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let db = dir.join("tansu.db");
        let _ = std::fs::remove_file(&db);
        assert!(!has_schema(&db).expect("no file"));
        let connection = Connection::open(&db).expect("create");
        connection
            .execute_batch(
                "create table record (topition integer, offset_id integer not null, v blob, \
                     primary key (topition, offset_id));
                 create table header (topition integer, offset_id integer, k blob, v blob, \
                     foreign key (topition, offset_id) references record (topition, offset_id) \
                     on delete cascade);",
            )
            .expect("schema");
        let plan = |connection: &Connection| -> String {
            connection
                .prepare(
                    "EXPLAIN QUERY PLAN SELECT h.k, h.v FROM header h JOIN record r \
                     ON h.topition = r.topition AND h.offset_id = r.offset_id \
                     WHERE r.topition = 1 AND r.offset_id = 5",
                )
                .expect("plan")
                .query_map([], |row| row.get::<_, String>(3))
                .expect("rows")
                .collect::<Result<Vec<_>, _>>()
                .expect("rows")
                .join("; ")
        };
        assert!(
            plan(&connection).contains("SCAN h"),
            "{}",
            plan(&connection)
        );
        drop(connection);
        assert!(has_schema(&db).expect("schema"));

        add_indexes(&db).expect("indexed");
        add_indexes(&db).expect("a second time changes nothing");
        assert!(indexes(&db)
            .expect("indexes")
            .contains(&"orderflow_header_record".to_owned()));
        let connection = Connection::open(&db).expect("open");
        let after = plan(&connection);
        assert!(
            after.contains("SEARCH h USING INDEX orderflow_header_record"),
            "{after}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
