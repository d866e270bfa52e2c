//! `orderflow backup DIR` and `orderflow restore DIR`: the commands around `orderflow_backup`,
//! on the configured broker and database or, with no broker configured, on the embedded broker
//! started on its data directory (the one `orderflow dev` uses; its lock refuses a second
//! broker on a directory `dev` is running on: back up a running `dev` with `--kafka-brokers`
//! and the address it prints).

use std::{path::Path, time::Instant};

use anyhow::{Context, Result};
use orderflow_backup::{BackupOptions, RestoreOptions};
use orderflow_platform::{kafka::KafkaClients, Settings};
use orderflow_projections::Database;
use orderflow_topics::Catalog;
use secrecy::ExposeSecret;

use crate::{embedded::Broker, redact_url};

fn progress(line: String) {
    eprintln!("  {line}");
}

/// `orderflow backup DIR [--full]`.
pub async fn backup(settings: &Settings, dir: &Path, options: BackupOptions) -> Result<()> {
    let started = Instant::now();
    let broker = Broker::from_settings(settings)?;
    let settings = &broker.client_settings(settings);
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
    let db = Database::connect(settings.database_url(), 2)
        .await
        .context("connecting to the database")?;
    db.require_schema()
        .await
        .context("checking the database schema")?;
    let catalog = Catalog::load()?;
    eprintln!(
        "Backing up {} and {} into {}",
        broker.bootstrap(),
        redact_url(settings.database_url().expose_secret()),
        dir.display()
    );
    let report = orderflow_backup::backup(dir, &clients, &db, &catalog, options, &progress)
        .await
        .with_context(|| format!("backing up into {}", dir.display()))?;
    println!(
        "backup {} written ({}) in {:.1}s: {} records from {} partitions, {} bytes",
        report.set,
        if report.incremental {
            "incremental"
        } else {
            "full"
        },
        started.elapsed().as_secs_f64(),
        report.records,
        report.partitions,
        report.bytes
    );
    Ok(())
}

/// `orderflow restore DIR [--force]`.
pub async fn restore(settings: &Settings, dir: &Path, options: RestoreOptions) -> Result<()> {
    let started = Instant::now();
    let broker = Broker::from_settings(settings)?;
    let settings = &broker.client_settings(settings);
    broker
        .apply_topics(settings)
        .await
        .context("creating the topics of the catalog")?;
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
    eprintln!(
        "Restoring {} into {} and {}",
        dir.display(),
        broker.bootstrap(),
        redact_url(settings.database_url().expose_secret())
    );
    let report =
        orderflow_backup::restore(dir, &clients, &settings.database_url(), options, &progress)
            .await
            .with_context(|| format!("restoring {}", dir.display()))?;
    println!(
        "restored {} backup sets in {:.1}s: {} records ({} orphaned by the cut left out), {} \
         projection positions and {} consumer group offsets mapped",
        report.sets,
        started.elapsed().as_secs_f64(),
        report.records,
        report.left_out,
        report.positions.len(),
        report.groups.len()
    );
    Ok(())
}
