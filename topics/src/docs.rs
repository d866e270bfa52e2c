//! Renders `docs/topics.md` from the catalog, so the documentation cannot drift from what
//! `topics apply` creates. `orderflow topics docs --check` fails when the file is stale.

use std::fmt::Write as _;

use crate::Catalog;

/// The Markdown document for `docs/topics.md`.
pub fn render_markdown(catalog: &Catalog) -> String {
    let mut out = String::new();
    out.push_str(
        "# Topics\n\n\
         <!-- Generated from topics/catalog.toml by `orderflow topics docs`; do not edit. -->\n\n\
         Every value on an event topic is Confluent-framed Avro: magic byte `0`, a 4-byte \
         big-endian schema id, then the Avro body. The schemas are in `schemas/avro/`. Headers: \
         `event_type` (the record name), `content-type`, and `traceparent` (W3C trace context) \
         when the event has one.\n\n\
         **Reading these topics downstream.** Read with `isolation.level=read_committed`, and \
         drop any record whose `envelope.event_id` you have seen before: every event id is \
         derived from its cause, so a re-processed input re-emits the same id, and the brokers \
         in use may show records of aborted transactions. Order within an order is by \
         `envelope.sequence`; all events of one customer are on one partition, in order. \
         Skip a record without a value: a discard of a dead letter held in sequence writes a \
         *release marker* to the letter's source partition (its key, headers \
         `orderflow.release.chain` and `orderflow.release.sequence`, no value), for the \
         processor that parked the key.\n\n\
         | topic | key | partitions | replication | cleanup | retention |\n\
         |---|---|---|---|---|---|\n",
    );
    for t in &catalog.topics {
        let retention = match t.retention_ms {
            Some(-1 | crate::FOREVER) => "forever".to_owned(),
            Some(ms) => format!("{} days", ms / 86_400_000),
            None => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "| [`{0}`](#{1}) | {2} | {3} | {4} | {5} | {6} |",
            t.name,
            t.name.replace('.', ""),
            t.key,
            t.partitions,
            t.replication,
            t.cleanup_policy.as_str(),
            retention
        );
    }
    for t in &catalog.topics {
        let _ = write!(
            out,
            "\n## {}\n\n{}\n\n- **Key:** {}\n- **Value:** {}\n",
            t.name, t.description, t.key, t.value
        );
        if let Some(why) = &t.retention_why {
            let _ = writeln!(out, "- **Retention:** {why}");
        }
        if !t.schemas.is_empty() {
            let _ = writeln!(
                out,
                "- **Schemas:** {}",
                t.schemas
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let _ = writeln!(out, "- **Producers:** {}", t.producers.join("; "));
        let _ = writeln!(out, "- **Consumers:** {}", t.consumers.join("; "));
        let configs = t
            .configs()
            .into_iter()
            .map(|(k, v)| format!("`{k}={v}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(out, "- **Configs:** {configs}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_docs_match_the_catalog() {
        let catalog = Catalog::load().expect("catalog is valid");
        let rendered = render_markdown(&catalog);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/topics.md");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == rendered,
            "docs/topics.md is stale: run `cargo run -- topics docs`"
        );
        for t in &catalog.topics {
            assert!(rendered.contains(&format!("## {}", t.name)));
        }
    }
}
