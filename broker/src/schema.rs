//! The indexes the broker's SQLite log needs and Tansu 0.6 does not create.
//!
//! - **`orderflow_header_record`.** Tansu 0.6's SQLite schema (`tansu-storage` 0.6,
//!   `ddl/040-header.sql`) gives the `header` table no index, yet a fetch looks up each record's
//!   headers by `(topition, offset_id)` (`sql/header_fetch.sql`), and each record a compaction
//!   deletes cascades to its headers by the same columns. Both scan the whole table. Every
//!   orderflow record carries headers, so the cost of a fetch grows with the log: measured on a
//!   crash test's log of 28,483 records and 46,856 headers, 1.8 ms per record fetched, until the
//!   broker spent its core scanning and stopped answering within minutes; with the index, 8 µs.
//! - **`orderflow_record_key`.** The broker's maintenance (at start and every 10 minutes)
//!   compacts every `compact` topic with `sql/policy_compact.sql`: for each key that has more
//!   than one record it looks for the key's older records by `(topition, offset_id <)` and
//!   compares keys row by row, a scan of the partition's log per duplicated key. The cost is
//!   quadratic in a partition's length, and the maintenance holds the broker's one storage task
//!   while it runs: on a changelog of 6 partitions × 8,000 records with 800 keys each, 19.6 s in
//!   which nothing is acknowledged, no session heartbeat is answered and the edge answers `503`
//!   (BENCHMARKS.md, the long runs). With an index on `(topition, k, offset_id)` the same
//!   search is a range of the index: 0.46 s, linear in the log. orderflow's storage patch
//!   now runs the maintenance in slices (`crate::install`); each slice finds its keys' older
//!   records through this index too (the tests below run the patch's statements).
//!
//! [`crate::DurableBroker`] adds them to the log file before it serves it (`CREATE INDEX IF NOT
//! EXISTS`: once per file, kept across runs; Tansu's own schema statements are `IF NOT EXISTS`
//! too and leave them alone).

use std::{path::Path, time::Duration};

use rusqlite::{Connection, OpenFlags};

use crate::BrokerError;

/// The indexes added, by name.
pub const INDEXES: &[(&str, &str)] = &[
    (
        "orderflow_header_record",
        "CREATE INDEX IF NOT EXISTS orderflow_header_record ON header (topition, offset_id)",
    ),
    (
        "orderflow_record_key",
        "CREATE INDEX IF NOT EXISTS orderflow_record_key ON record (topition, k, offset_id)",
    ),
];

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
                     k blob, primary key (topition, offset_id));
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
        let names = indexes(&db).expect("indexes");
        for (name, _) in INDEXES {
            assert!(names.contains(&(*name).to_owned()), "{name} in {names:?}");
        }
        let connection = Connection::open(&db).expect("open");
        let after = plan(&connection);
        assert!(
            after.contains("SEARCH h USING INDEX orderflow_header_record"),
            "{after}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The compaction of `sql/policy_compact.sql` reduced to its searches of `record` (the
    /// joins that pick the `compact` topics' partitions become `topition IN (1, 2)`; the plan's
    /// shape is the same): without the index, each duplicated key's older records are found by
    /// a range of offsets, the partition's log read once per key; with it, by the key.
    #[test]
    fn compaction_finds_a_keys_older_records_through_the_index() {
        let connection = Connection::open_in_memory().expect("open");
        connection
            .execute_batch(
                "create table record (topition integer, offset_id integer not null, v blob, \
                     k blob, primary key (topition, offset_id));",
            )
            .expect("schema");
        for offset in 0..12_i64 {
            connection
                .execute(
                    "insert into record (topition, offset_id, v, k) values (1, ?1, x'00', ?2)",
                    rusqlite::params![offset, format!("key-{}", offset % 3)],
                )
                .expect("insert");
        }
        let compaction = "WITH dup AS (SELECT r.topition AS topition, r.k AS k, \
                 max(r.offset_id) AS offset_id FROM record r \
                 WHERE r.topition IN (1, 2) AND r.k IS NOT NULL \
                 GROUP BY r.topition, r.k HAVING count(r.k) > 1), \
             compaction AS (SELECT r.topition AS topition, r.offset_id AS offset_id \
                 FROM record r JOIN dup ON r.topition = dup.topition AND r.k = dup.k \
                 WHERE dup.offset_id > r.offset_id) \
             DELETE FROM record WHERE (record.topition, record.offset_id) \
                 IN (SELECT * FROM compaction)";
        let plan = |connection: &Connection| -> String {
            connection
                .prepare(&format!("EXPLAIN QUERY PLAN {compaction}"))
                .expect("plan")
                .query_map([], |row| row.get::<_, String>(3))
                .expect("rows")
                .collect::<Result<Vec<_>, _>>()
                .expect("rows")
                .join("; ")
        };
        let before = plan(&connection);
        assert!(before.contains("(topition=? AND offset_id<?)"), "{before}");

        for (name, statement) in INDEXES {
            if *name == "orderflow_record_key" {
                connection.execute_batch(statement).expect("index");
            }
        }
        let after = plan(&connection);
        assert!(
            after.contains(
                "USING COVERING INDEX orderflow_record_key (topition=? AND k=? AND offset_id<?)"
            ),
            "{after}"
        );
        // And the compaction still keeps exactly the last record of each key.
        connection.execute_batch(compaction).expect("compact");
        let kept: Vec<i64> = connection
            .prepare("SELECT offset_id FROM record ORDER BY offset_id")
            .expect("select")
            .query_map([], |row| row.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(kept, vec![9, 10, 11]);
    }

    /// The text of one of the maintenance's statements as the storage patch ships it
    /// (`MAINTENANCE_SQL` in `tansu-storage`'s `src/lite.rs`), with Tansu's `$n` parameters
    /// written as SQLite's `?n`, as Tansu prepares them.
    fn maintenance_sql(name: &str) -> String {
        let (_, diff) = crate::install::PATCHES
            .iter()
            .find(|(crate_name, _)| *crate_name == "tansu-storage")
            .expect("storage patch");
        let start = format!("(\"{name}\", \"");
        let line = diff
            .lines()
            .find(|line| line.starts_with('+') && line.contains(&start))
            .unwrap_or_else(|| panic!("{name} in the storage patch"));
        let (_, rest) = line.split_once(&start).expect("opening");
        let sql = rest.strip_suffix("\"),").expect("closing");
        let mut fixed = String::with_capacity(sql.len());
        let mut chars = sql.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
                fixed.push('?');
            } else {
                fixed.push(c);
            }
        }
        fixed
    }

    fn query_plan(connection: &Connection, sql: &str) -> String {
        let mut statement = connection
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("plan");
        let unbound = vec![rusqlite::types::Null; statement.parameter_count()];
        statement
            .query_map(rusqlite::params_from_iter(unbound), |row| {
                row.get::<_, String>(3)
            })
            .expect("rows")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows")
            .join("; ")
    }

    /// `record` as Tansu 0.6 creates it (the columns the maintenance reads), with the index.
    fn record_table() -> Connection {
        let connection = Connection::open_in_memory().expect("open");
        connection
            .execute_batch(
                "create table record (topition integer, offset_id integer not null, \
                     timestamp integer, v blob, k blob, primary key (topition, offset_id));",
            )
            .expect("schema");
        for (name, statement) in INDEXES {
            if *name == "orderflow_record_key" {
                connection.execute_batch(statement).expect("index");
            }
        }
        connection
    }

    fn offsets(connection: &Connection, topition: i64) -> Vec<i64> {
        connection
            .prepare("SELECT offset_id FROM record WHERE topition = ?1 ORDER BY offset_id")
            .expect("select")
            .query_map([topition], |row| row.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    /// A slice reads its records by offset (never the partition's whole key index, which
    /// SQLite prefers, without the `+k`, to spare a sort) and each key's older records through
    /// the key index; a retention slice reads the partition's start by offset. Nothing scans.
    #[test]
    fn a_maintenance_slice_reads_a_range_of_offsets_and_searches_keys_through_the_index() {
        let connection = record_table();
        let compact = query_plan(&connection, &maintenance_sql("orderflow/compact_slice.sql"));
        assert!(
            compact.contains("(topition=? AND offset_id>? AND offset_id<?)"),
            "{compact}"
        );
        assert!(
            compact.contains(
                "USING COVERING INDEX orderflow_record_key (topition=? AND k=? AND offset_id<?)"
            ),
            "{compact}"
        );
        assert!(!compact.contains("(topition=? AND k>?)"), "{compact}");
        let end = query_plan(
            &connection,
            &maintenance_sql("orderflow/compact_slice_end.sql"),
        );
        assert!(end.contains("(topition=? AND offset_id>?)"), "{end}");
        let retention = query_plan(
            &connection,
            &maintenance_sql("orderflow/retention_slice.sql"),
        );
        assert!(
            retention.contains("(topition=? AND offset_id<?)"),
            "{retention}"
        );
        for plan in [&compact, &end, &retention] {
            assert!(!plan.contains("SCAN record"), "{plan}");
        }
    }

    /// Compaction slice by slice, as the patched maintenance runs it (the end of the next
    /// slice, then the slice), over a log of 3 partitions written in an interleaved order:
    /// every key keeps exactly its latest record, other partitions and keyless records are
    /// untouched, a second pass finds nothing, and records appended later are compacted from
    /// where the last pass stopped.
    #[test]
    fn compaction_in_slices_keeps_exactly_the_latest_record_of_every_key() {
        let connection = record_table();
        let insert = |topition: i64, offset: i64, key: Option<String>| {
            connection
                .execute(
                    "insert into record (topition, offset_id, timestamp, v, k) \
                     values (?1, ?2, 0, x'00', ?3)",
                    rusqlite::params![topition, offset, key.map(String::into_bytes)],
                )
                .expect("insert");
        };
        // Partition 1: 5,000 records over 700 keys (three slices of 2,000 here),
        // every 100th record keyless. Partition 2 shares the keys and is not compacted.
        for offset in 0..5_000_i64 {
            let key = (offset % 100 != 99).then(|| format!("key-{}", (offset * 7) % 700));
            insert(1, offset, key.clone());
            insert(2, offset, key);
        }
        let end_sql = maintenance_sql("orderflow/compact_slice_end.sql");
        let slice_sql = maintenance_sql("orderflow/compact_slice.sql");
        let slice = 2_000_i64;
        let pass = |from: &mut i64| -> (usize, usize) {
            let (mut slices, mut deleted) = (0, 0);
            loop {
                let (to, read): (Option<i64>, i64) = connection
                    .query_row(&end_sql, rusqlite::params![1, *from, slice], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })
                    .expect("end");
                let Some(to) = to else { break };
                deleted += connection
                    .execute(&slice_sql, rusqlite::params![1, *from, to])
                    .expect("slice");
                *from = to;
                slices += 1;
                if read < slice {
                    break;
                }
            }
            (slices, deleted)
        };
        let expected = |last: i64| -> Vec<i64> {
            let mut latest = std::collections::BTreeMap::new();
            let mut keyless = Vec::new();
            for offset in 0..last {
                if offset % 100 == 99 {
                    keyless.push(offset);
                } else {
                    latest.insert((offset * 7) % 700, offset);
                }
            }
            let mut kept: Vec<i64> = latest.into_values().chain(keyless).collect();
            kept.sort_unstable();
            kept
        };

        let mut from = -1;
        let (slices, deleted) = pass(&mut from);
        assert_eq!(slices, 3, "5,000 records in slices of 2,000");
        assert_eq!(offsets(&connection, 1), expected(5_000));
        assert_eq!(deleted, 5_000 - expected(5_000).len());
        assert_eq!(offsets(&connection, 2).len(), 5_000, "another partition");
        assert_eq!(from, 4_999);
        assert_eq!(pass(&mut from), (0, 0), "a second pass has nothing to do");

        for offset in 5_000..6_000_i64 {
            let key = (offset % 100 != 99).then(|| format!("key-{}", (offset * 7) % 700));
            insert(1, offset, key);
        }
        let (slices, _) = pass(&mut from);
        assert_eq!(slices, 1, "only what was appended since");
        assert_eq!(offsets(&connection, 1), expected(6_000));
    }

    /// Retention deletes a partition's expired start, a slice at a time, and stops at the
    /// first record within retention: an old record behind a newer one stays (Kafka loses a
    /// log's start, never its middle), as does one without a timestamp.
    #[test]
    fn retention_deletes_the_expired_start_of_a_partition_in_slices() {
        let connection = record_table();
        let now = 1_000_000_i64;
        let retention = 60_000_i64;
        let old = now - 2 * retention;
        for offset in 0..4_500_i64 {
            let timestamp = if offset < 4_100 { old } else { now };
            connection
                .execute(
                    "insert into record (topition, offset_id, timestamp, v, k) \
                     values (1, ?1, ?2, x'00', NULL)",
                    rusqlite::params![offset, timestamp],
                )
                .expect("insert");
        }
        connection
            .execute(
                "update record set timestamp = ?1 where offset_id = 4200",
                [old],
            )
            .expect("an old record behind newer ones");
        let sql = maintenance_sql("orderflow/retention_slice.sql");
        let slice = |limit: i64| -> usize {
            connection
                .execute(&sql, rusqlite::params![1, now, retention, limit])
                .expect("slice")
        };
        assert_eq!(slice(2_000), 2_000);
        assert_eq!(slice(2_000), 2_000);
        assert_eq!(slice(2_000), 100);
        assert_eq!(slice(2_000), 0);
        let kept = offsets(&connection, 1);
        assert_eq!(kept.first(), Some(&4_100));
        assert_eq!(kept.len(), 400);
        assert!(kept.contains(&4_200));

        connection
            .execute(
                "update record set timestamp = ?1 where offset_id = 4100",
                [old],
            )
            .expect("the first record expires");
        connection
            .execute(
                "update record set timestamp = NULL where offset_id = 4101",
                [],
            )
            .expect("a record without a timestamp");
        assert_eq!(
            slice(2_000),
            1,
            "a record without a timestamp stops retention"
        );
        assert_eq!(offsets(&connection, 1).first(), Some(&4_101));
    }
}
