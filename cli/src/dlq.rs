//! `orderflow dlq`: the dead-letter topics for people — listings, one letter in full, and the
//! redrive and discard commands (the work is `orderflow_deadletters`').

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use orderflow_deadletters::{Correction, DeadLetter, DeadLetters, LetterId, Resolution};
use orderflow_platform::{kafka::KafkaClients, Settings};
use orderflow_schemas::Codec;

use crate::format_ms;

/// How long a read of a topic or an acknowledgement may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The dead letters of the configured cluster.
pub fn connect(settings: &Settings) -> Result<DeadLetters> {
    if settings.kafka.brokers.trim().is_empty() {
        bail!("kafka.brokers is not set; the dead letters are on the broker (for `orderflow dev`: --kafka-brokers with the address it prints)");
    }
    let clients = KafkaClients::new(&settings.kafka, &settings.kafka.brokers);
    Ok(DeadLetters::new(clients, Arc::new(Codec::new()?), TIMEOUT))
}

/// Who is resolving: `--by`, else the user's login name.
pub fn who(by: Option<String>) -> String {
    by.or_else(|| std::env::var("USER").ok())
        .filter(|b| !b.trim().is_empty())
        .unwrap_or_else(|| "orderflow dlq".to_owned())
}

/// `orderflow dlq list`: with no topic, each dead-letter topic's pending and resolved counts;
/// with one, its letters (pending only, unless `all`).
pub async fn list(dlq: &DeadLetters, topic: Option<&str>, all: bool, json: bool) -> Result<()> {
    let Some(topic) = topic else {
        let summaries = dlq.summaries().await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&summaries)?);
        } else {
            println!("{:<36}  {:>8}  {:>8}", "topic", "pending", "resolved");
            for s in summaries {
                let more = if s.older_not_read > 0 {
                    format!("  (and {} older, not read)", s.older_not_read)
                } else {
                    String::new()
                };
                println!("{:<36}  {:>8}  {:>8}{more}", s.topic, s.pending, s.resolved);
            }
        }
        return Ok(());
    };
    let (letters, left_out) = dlq.list(topic).await?;
    let shown: Vec<&DeadLetter> = letters.iter().filter(|l| all || l.is_pending()).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    println!(
        "{:<10}  {:<24}  {:<10}  {:<36}  {:<8}  reason",
        "letter", "dead since", "state", "source", "place"
    );
    for letter in &shown {
        let source = letter
            .source
            .as_ref()
            .map(|s| format!("{}/{}/{}", s.topic, s.partition, s.offset))
            .unwrap_or_else(|| "?".into());
        println!(
            "{:<10}  {:<24}  {:<10}  {:<36}  {:<8}  {}",
            format!("{}/{}", letter.letter.partition, letter.letter.offset),
            letter.timestamp_ms.map(format_ms).unwrap_or_default(),
            letter
                .resolution
                .as_ref()
                .map(Resolution::action)
                .unwrap_or("pending"),
            source,
            place(letter),
            letter.reason.as_deref().unwrap_or("?")
        );
    }
    let resolved = letters.len() - letters.iter().filter(|l| l.is_pending()).count();
    eprintln!(
        "{} letter(s) shown; {} pending, {resolved} resolved{}{}",
        shown.len(),
        letters.len() - resolved,
        if all {
            ""
        } else {
            " (--all shows the resolved ones)"
        },
        if left_out > 0 {
            format!("; {left_out} older letter(s) not read")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// A sequenced letter's place in its chain (`0` parked the key, `3h` was held), else `-`.
fn place(letter: &DeadLetter) -> String {
    match letter.sequence {
        Some(n) if letter.held => format!("{n}h"),
        Some(n) => n.to_string(),
        None => "-".into(),
    }
}

/// `orderflow dlq release`.
pub async fn release(dlq: &DeadLetters, topic: Option<&str>) -> Result<()> {
    let released = match topic {
        Some(topic) => dlq.release_in(topic).await?,
        None => dlq.release_ready().await?,
    };
    println!("{released} held letter(s) released");
    Ok(())
}

/// `orderflow dlq show`.
pub async fn show(dlq: &DeadLetters, topic: &str, letter: &str, json: bool) -> Result<()> {
    let letter = LetterId::parse(topic, letter)?;
    let dead = dlq.get(&letter).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&dead)?);
        return Ok(());
    }
    println!("letter:     {}", dead.letter);
    if let Some(at) = dead.timestamp_ms {
        println!("dead since: {}", format_ms(at));
    }
    println!(
        "state:      {}",
        dead.resolution
            .as_ref()
            .map(|r| format!("{} {}", r.action(), r.summary()))
            .unwrap_or_else(|| "pending".into())
    );
    println!("reason:     {}", dead.reason.as_deref().unwrap_or("?"));
    println!("consumer:   {}", dead.consumer.as_deref().unwrap_or("?"));
    if let Some(s) = &dead.source {
        println!("source:     {}/{}/{}", s.topic, s.partition, s.offset);
    }
    if let (Some(chain), Some(n)) = (&dead.chain, dead.sequence) {
        println!(
            "chain:      {chain}, place {n}{}",
            if dead.held {
                " (held behind the chain's earlier letters)"
            } else {
                ""
            }
        );
    }
    println!("key:        {}", dead.key.as_deref().unwrap_or("(none)"));
    for (name, value) in &dead.headers {
        println!("header:     {name}: {value}");
    }
    match (&dead.event_type, &dead.event, &dead.undecodable) {
        (Some(kind), Some(event), _) => {
            println!("event:      {kind}");
            println!("{}", serde_json::to_string_pretty(event)?);
        }
        (_, _, Some(why)) => {
            println!(
                "value:      {} bytes that do not decode: {why}",
                dead.value_len
            );
            println!(
                "            first bytes (hex): {}",
                dead.value_prefix_hex.as_deref().unwrap_or("")
            );
        }
        _ => println!("value:      {} bytes", dead.value_len),
    }
    Ok(())
}

/// `orderflow dlq redrive`.
pub async fn redrive(
    dlq: &DeadLetters,
    topic: &str,
    letter: &str,
    from: Option<&Path>,
    by: &str,
) -> Result<()> {
    let letter = LetterId::parse(topic, letter)?;
    let correction = match from {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let document: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not JSON", path.display()))?;
            Some(Correction::from_json(&document).with_context(|| path.display().to_string())?)
        }
    };
    let resolution = dlq.redrive(&letter, correction, by).await?;
    println!("{letter} {} {}", resolution.action(), resolution.summary());
    Ok(())
}

/// `orderflow dlq discard`.
pub async fn discard(
    dlq: &DeadLetters,
    topic: &str,
    letter: &str,
    note: &str,
    by: &str,
) -> Result<()> {
    let letter = LetterId::parse(topic, letter)?;
    if note.trim().is_empty() {
        bail!("--note: say why the letter is discarded");
    }
    let resolution = dlq.discard(&letter, note, by).await?;
    println!("{letter} {} {}", resolution.action(), resolution.summary());
    Ok(())
}
