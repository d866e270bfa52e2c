//! Which database schemas this binary runs on, and the one command that changes the schema.
//!
//! Only `orderflow migrate` (and `orderflow dev`, which is its own operator) applies migrations;
//! every role checks at start, and `/readyz` on every probe, that the schema is one it can run
//! on ([`Database::check_schema`]):
//!
//! - every migration this binary knows is applied, successfully, with the checksum it has;
//! - migrations it does not know are allowed only *after* all of its own: they come from a newer
//!   release, and under the expand/contract rule (docs/runbooks/deploy.md) a migration never
//!   breaks the release before it: it adds tables, nullable columns or indexes, and drops or
//!   tightens only what no release still running uses (a contract step, one release later).
//!
//! Applying is as lenient as running: [`Database::migrate`] of an older binary (a rollback's
//! migration Job) passes over the newer migrations it does not know instead of refusing the
//! database, and still refuses an applied migration whose checksum differs from its own.

use std::{collections::BTreeMap, fmt, sync::LazyLock};

use sqlx::{migrate::Migrator, Row};

use crate::{Backend, Database, DbError, Result};

static SQLITE: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("./migrations/sqlite");
    migrator.set_ignore_missing(true);
    migrator
});
static POSTGRES: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.set_ignore_missing(true);
    migrator
});

/// A migration as recorded or as known: version and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationId {
    pub version: i64,
    pub description: String,
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.version, self.description)
    }
}

/// Why this binary cannot run on a database's schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("migrations not applied: the database has none; run `orderflow migrate` first")]
    NotMigrated,
    #[error(
        "migrations not applied (at {at}, this binary needs {latest}): {} — run `orderflow migrate` of this release first",
        list(.missing)
    )]
    Behind {
        at: i64,
        latest: i64,
        missing: Vec<MigrationId>,
    },
    #[error("migration {0} failed part-way when it was applied: repair it by hand, then run `orderflow migrate`")]
    Failed(MigrationId),
    #[error("migration {0} was applied with other contents than this binary's: the migration was edited after it was released")]
    Modified(MigrationId),
    #[error(
        "the database has migrations this binary does not know before its own latest ({}): it was migrated by another line of releases",
        list(.0)
    )]
    Foreign(Vec<MigrationId>),
}

fn list(ids: &[MigrationId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A schema this binary runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compatible {
    /// The newest migration this binary knows (all of them are applied).
    pub latest: i64,
    /// Applied migrations of a newer release (expand steps), oldest first.
    pub newer: Vec<MigrationId>,
}

impl Database {
    fn migrator(&self) -> &'static Migrator {
        match self.backend {
            Backend::Sqlite => &SQLITE,
            Backend::Postgres => &POSTGRES,
        }
    }

    /// The migrations this binary knows, oldest first.
    pub fn known_migrations(&self) -> Vec<MigrationId> {
        self.migrator()
            .iter()
            .map(|m| MigrationId {
                version: m.version,
                description: m.description.to_string(),
            })
            .collect()
    }

    /// Applies every migration of this binary that is not applied yet (see the module docs:
    /// newer migrations of another release are passed over, edited ones refused).
    pub async fn migrate(&self) -> Result<()> {
        self.migrator().run(&self.pool).await?;
        Ok(())
    }

    /// Whether this binary can run on the database's schema (module docs). `Err(DbError)` when
    /// the database cannot be asked; `Ok(Err(_))` names what is wrong with the schema.
    pub async fn check_schema(&self) -> Result<std::result::Result<Compatible, SchemaError>> {
        let rows = match sqlx::query(
            // `success` as a number: sqlx's Any driver decodes no SQLite BOOLEAN.
            "SELECT version, description, CAST(CASE WHEN success THEN 1 ELSE 0 END AS BIGINT), checksum \
             FROM _sqlx_migrations ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        {
            Ok(rows) => rows,
            // No table: never migrated.
            Err(sqlx::Error::Database(_)) => return Ok(Err(SchemaError::NotMigrated)),
            Err(e) => return Err(DbError::Sqlx(e)),
        };
        let mut applied = BTreeMap::new();
        for row in rows {
            let version: i64 = row.try_get(0)?;
            let description: String = row.try_get(1)?;
            let success = row.try_get::<i64, _>(2)? != 0;
            let checksum: Vec<u8> = row.try_get(3)?;
            applied.insert(version, (description, success, checksum));
        }
        Ok(judge(self.migrator(), &applied))
    }

    /// [`check_schema`](Self::check_schema) for a role about to start: an incompatible schema
    /// is an error naming what is wrong; migrations of a newer release are logged.
    pub async fn require_schema(&self) -> Result<Compatible> {
        let compatible = self.check_schema().await??;
        if !compatible.newer.is_empty() {
            tracing::info!(
                newer = %list(&compatible.newer),
                latest_known = compatible.latest,
                "The database has migrations of a newer release (expand steps); this release runs on it."
            );
        }
        Ok(compatible)
    }
}

type Applied = BTreeMap<i64, (String, bool, Vec<u8>)>;

fn judge(migrator: &Migrator, applied: &Applied) -> std::result::Result<Compatible, SchemaError> {
    if applied.is_empty() {
        return Err(SchemaError::NotMigrated);
    }
    let latest = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    let mut missing = Vec::new();
    for known in migrator.iter() {
        let id = MigrationId {
            version: known.version,
            description: known.description.to_string(),
        };
        match applied.get(&known.version) {
            None => missing.push(id),
            Some((_, false, _)) => return Err(SchemaError::Failed(id)),
            Some((_, true, checksum)) if checksum.as_slice() != &*known.checksum => {
                return Err(SchemaError::Modified(id))
            }
            Some(_) => {}
        }
    }
    if !missing.is_empty() {
        let at = applied.keys().copied().max().unwrap_or(0);
        return Err(SchemaError::Behind {
            at,
            latest,
            missing,
        });
    }
    let (mut foreign, mut newer) = (Vec::new(), Vec::new());
    for (version, (description, success, _)) in applied {
        if migrator.iter().any(|m| m.version == *version) {
            continue;
        }
        let id = MigrationId {
            version: *version,
            description: description.clone(),
        };
        if !success {
            return Err(SchemaError::Failed(id));
        }
        if *version < latest {
            foreign.push(id);
        } else {
            newer.push(id);
        }
    }
    if !foreign.is_empty() {
        return Err(SchemaError::Foreign(foreign));
    }
    Ok(Compatible { latest, newer })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied_all(migrator: &Migrator) -> Applied {
        migrator
            .iter()
            .map(|m| {
                (
                    m.version,
                    (m.description.to_string(), true, m.checksum.to_vec()),
                )
            })
            .collect()
    }

    #[test]
    fn every_known_migration_applied_is_compatible() {
        let applied = applied_all(&SQLITE);
        let ok = judge(&SQLITE, &applied).expect("compatible");
        assert!(ok.newer.is_empty());
        assert_eq!(ok.latest, *applied.keys().last().expect("migrations"));
    }

    #[test]
    fn a_newer_release_s_migration_is_compatible_and_reported() {
        let mut applied = applied_all(&POSTGRES);
        applied.insert(
            99_991_231_000_000,
            ("gift note".to_owned(), true, vec![1, 2, 3]),
        );
        let ok = judge(&POSTGRES, &applied).expect("compatible");
        assert_eq!(
            ok.newer,
            vec![MigrationId {
                version: 99_991_231_000_000,
                description: "gift note".to_owned()
            }]
        );
    }

    #[test]
    fn a_missing_migration_is_named_with_the_command_that_applies_it() {
        let mut applied = applied_all(&SQLITE);
        let (&last, _) = applied.iter().next_back().expect("migrations");
        applied.remove(&last);
        let err = judge(&SQLITE, &applied).expect_err("behind");
        assert!(
            matches!(&err, SchemaError::Behind { missing, .. } if missing.len() == 1 && missing[0].version == last)
        );
        let message = err.to_string();
        assert!(message.contains(&last.to_string()), "{message}");
        assert!(message.contains("orderflow migrate"), "{message}");
        assert_eq!(
            judge(&SQLITE, &Applied::new()),
            Err(SchemaError::NotMigrated)
        );
    }

    #[test]
    fn an_edited_failed_or_foreign_migration_is_refused() {
        let mut edited = applied_all(&SQLITE);
        let first = *edited.keys().next().expect("migrations");
        edited.get_mut(&first).expect("first").2 = vec![0; 48];
        assert!(matches!(
            judge(&SQLITE, &edited),
            Err(SchemaError::Modified(id)) if id.version == first
        ));

        let mut failed = applied_all(&SQLITE);
        failed.get_mut(&first).expect("first").1 = false;
        assert!(matches!(
            judge(&SQLITE, &failed),
            Err(SchemaError::Failed(_))
        ));

        let mut foreign = applied_all(&SQLITE);
        foreign.insert(first - 1, ("elsewhere".to_owned(), true, vec![]));
        assert!(matches!(
            judge(&SQLITE, &foreign),
            Err(SchemaError::Foreign(ids)) if ids[0].version == first - 1
        ));
    }
}
