//! The database's part of a backup: a consistent copy taken while the pipeline writes, and its
//! restore into an empty database.
//!
//! - **SQLite**: `VACUUM INTO` writes a consistent copy of the live file from one read
//!   transaction (SQLite's online alternative to its backup API, which sqlx does not expose);
//!   the restore copies it into place.
//! - **PostgreSQL**: `pg_dump --format=custom` run on a snapshot exported by a repeatable-read
//!   transaction that also reads the projections' positions, so the positions recorded in the
//!   manifest are exactly the ones in the dump; the restore is `pg_restore --single-transaction
//!   --exit-on-error`. Both tools come from the PostgreSQL client package; the password, if the
//!   URL has one, is handed over in `PGPASSWORD`, never on a command line.

use std::path::Path;

use orderflow_db::{sqlite_path, Backend, Database};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{Connection, Row};

use crate::{
    manifest::{DatabaseKind, ProjectionPosition},
    offsets::OffsetMap,
    BackupError, Result,
};

const POSITIONS: &str = "SELECT projection, topic, CAST(partition_id AS BIGINT), next_offset \
                         FROM projection_offsets ORDER BY projection, topic, partition_id";

fn positions_from(rows: Vec<sqlx::any::AnyRow>) -> Result<Vec<ProjectionPosition>> {
    rows.into_iter()
        .map(|row| {
            Ok(ProjectionPosition {
                projection: row.try_get(0)?,
                topic: row.try_get(1)?,
                partition: i32::try_from(row.try_get::<i64, _>(2)?).unwrap_or(i32::MAX),
                next_offset: row.try_get(3)?,
            })
        })
        .collect()
}

/// Copies the database consistently to `to`; returns its kind and the projections' positions
/// the copy holds.
pub(crate) async fn snapshot(
    db: &Database,
    to: &Path,
) -> Result<(DatabaseKind, Vec<ProjectionPosition>)> {
    match db.backend() {
        Backend::Sqlite => {
            let target = to.to_str().ok_or_else(|| BackupError::Io {
                path: to.to_owned(),
                source: std::io::Error::other("the path is not UTF-8"),
            })?;
            sqlx::query("VACUUM INTO $1")
                .bind(target.to_owned())
                .execute(db.pool())
                .await?;
            let mut copy =
                sqlx::AnyConnection::connect(&format!("sqlite://{target}?mode=ro")).await?;
            let positions = positions_from(sqlx::query(POSITIONS).fetch_all(&mut copy).await?)?;
            copy.close().await?;
            Ok((DatabaseKind::Sqlite, positions))
        }
        Backend::Postgres => {
            let mut tx = db.pool().begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
            let snapshot: String = sqlx::query("SELECT pg_export_snapshot()")
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            let positions = positions_from(sqlx::query(POSITIONS).fetch_all(&mut *tx).await?)?;
            let mut dump = tokio::process::Command::new("pg_dump");
            dump.arg("--format=custom")
                .arg("--no-owner")
                .arg(format!("--snapshot={snapshot}"))
                .arg("--file")
                .arg(to);
            run_libpq_tool(dump, "pg_dump", db.url()).await?;
            tx.commit().await?;
            Ok((DatabaseKind::Postgres, positions))
        }
    }
}

/// Restores the copy at `file` into the database at `url`, checked by [`check_target`] first;
/// `force` replaces what is there.
pub(crate) async fn restore(
    kind: DatabaseKind,
    file: &Path,
    url: &SecretString,
    force: bool,
) -> Result<()> {
    let backend: Backend = url.expose_secret().parse()?;
    match (kind, backend) {
        (DatabaseKind::Sqlite, Backend::Sqlite) => {
            let path = sqlite_path(url.expose_secret()).ok_or_else(|| {
                BackupError::Target("an in-memory SQLite database cannot be restored into".into())
            })?;
            let io = |path: &Path| {
                let path = path.to_owned();
                move |source| BackupError::Io { path, source }
            };
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
            }
            for suffix in ["-wal", "-shm"] {
                let side = path.with_file_name(format!(
                    "{}{suffix}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ));
                match std::fs::remove_file(&side) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io(&side)(e));
                    }
                    _ => {}
                }
            }
            let partial = path.with_extension("restoring");
            std::fs::copy(file, &partial).map_err(io(&partial))?;
            std::fs::File::open(&partial)
                .and_then(|f| f.sync_all())
                .map_err(io(&partial))?;
            std::fs::rename(&partial, &path).map_err(io(&path))?;
            Ok(())
        }
        (DatabaseKind::Postgres, Backend::Postgres) => {
            let db = Database::connect(url.clone(), 1).await?;
            // The dump grants SELECT to the analysts' role (migration 5), which is the
            // cluster's, not the database's: created here when the target cluster lacks it.
            sqlx::query(
                "DO $$ BEGIN CREATE ROLE orderflow_analyst NOLOGIN; \
                 EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
            )
            .execute(db.pool())
            .await?;
            db.pool().close().await;
            let mut command = tokio::process::Command::new("pg_restore");
            command
                .arg("--no-owner")
                .arg("--exit-on-error")
                .arg("--single-transaction");
            if force {
                command.arg("--clean").arg("--if-exists");
            }
            command.arg(file);
            run_libpq_tool(command, "pg_restore", url).await
        }
        (kind, backend) => Err(BackupError::Target(format!(
            "the backup holds a {kind:?} database and the target is {backend:?}"
        ))),
    }
}

/// Refuses a database of another kind than the backup's, and (unless `force`) one that is not
/// empty: a SQLite file that exists, a PostgreSQL database with tables in its `public` schema.
pub(crate) async fn check_target(
    kind: DatabaseKind,
    url: &SecretString,
    force: bool,
) -> Result<()> {
    let backend = url.expose_secret().parse::<Backend>()?;
    match (kind, backend) {
        (DatabaseKind::Sqlite, Backend::Sqlite) | (DatabaseKind::Postgres, Backend::Postgres) => {}
        (kind, backend) => {
            return Err(BackupError::Target(format!(
                "the backup holds a {kind:?} database and the target is {backend:?}: restore \
                 into the same kind"
            )))
        }
    }
    if force {
        return Ok(());
    }
    match backend {
        Backend::Sqlite => match sqlite_path(url.expose_secret()) {
            Some(path) if path.exists() => Err(BackupError::NotEmpty(format!(
                "the database file {} exists",
                path.display()
            ))),
            Some(_) => Ok(()),
            None => Err(BackupError::Target(
                "an in-memory SQLite database cannot be restored into".into(),
            )),
        },
        Backend::Postgres => {
            let db = Database::connect(url.clone(), 1).await?;
            let tables: i64 = sqlx::query(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'",
            )
            .fetch_one(db.pool())
            .await?
            .try_get(0)?;
            db.pool().close().await;
            if tables > 0 {
                return Err(BackupError::NotEmpty(format!(
                    "the database has {tables} tables in its public schema"
                )));
            }
            Ok(())
        }
    }
}

/// Rewrites the projections' positions of the restored database through `map`; returns them.
pub(crate) async fn remap_positions(
    url: &SecretString,
    map: &OffsetMap,
) -> Result<Vec<ProjectionPosition>> {
    let db = Database::connect(url.clone(), 1).await?;
    let mut tx = db.begin_write().await?;
    let mut positions = positions_from(sqlx::query(POSITIONS).fetch_all(&mut *tx).await?)?;
    for position in &mut positions {
        let Some(new) = map.position(&position.topic, position.partition, position.next_offset)
        else {
            return Err(BackupError::Manifest(format!(
                "projection {} has a position on {}/{}, which the backup does not hold",
                position.projection, position.topic, position.partition
            )));
        };
        sqlx::query(
            "UPDATE projection_offsets SET next_offset = $1 \
             WHERE projection = $2 AND topic = $3 AND partition_id = $4",
        )
        .bind(new)
        .bind(position.projection.clone())
        .bind(position.topic.clone())
        .bind(i64::from(position.partition))
        .execute(&mut *tx)
        .await?;
        position.next_offset = new;
    }
    tx.commit().await?;
    db.pool().close().await;
    Ok(positions)
}

/// Runs a PostgreSQL client tool against `url`: the URL without its password as the database
/// argument, the password in `PGPASSWORD`. Its stderr becomes the error.
async fn run_libpq_tool(
    mut command: tokio::process::Command,
    tool: &str,
    url: &SecretString,
) -> Result<()> {
    let (uri, password) = split_password(url.expose_secret());
    command.arg("--dbname").arg(uri);
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let output = command.output().await.map_err(|e| {
        BackupError::Tool(
            tool.to_owned(),
            format!(
                "cannot run it ({e}); install the PostgreSQL client (Debian: postgresql-client)"
            ),
        )
    })?;
    if !output.status.success() {
        return Err(BackupError::Tool(
            tool.to_owned(),
            format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// `postgres://user:secret@host/db?x` → (`postgres://user@host/db?x`, `secret` decoded).
fn split_password(url: &str) -> (String, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (url.to_owned(), None);
    };
    let Some((user, password)) = userinfo.split_once(':') else {
        return (url.to_owned(), None);
    };
    (
        format!("{scheme}://{user}@{host}{tail}"),
        Some(percent_decode(password)),
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_leaves_the_url_for_the_environment() {
        assert_eq!(
            split_password("postgres://app:s%40cret@db:5432/orders?sslmode=verify-full"),
            (
                "postgres://app@db:5432/orders?sslmode=verify-full".to_owned(),
                Some("s@cret".to_owned())
            )
        );
        assert_eq!(
            split_password("postgres://postgres@127.0.0.1/x"),
            ("postgres://postgres@127.0.0.1/x".to_owned(), None)
        );
        assert_eq!(
            split_password("postgres:///x?host=/run/postgresql"),
            ("postgres:///x?host=/run/postgresql".to_owned(), None)
        );
    }
}
