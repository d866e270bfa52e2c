//! The record files of a backup: one Avro object container file per topic partition and backup
//! set, every record with its offset, timestamp, key, value and headers. Avro's container
//! format carries its own schema (so any Avro reader opens the files: `avro-tools tojson`,
//! Python's `fastavro`), compresses each block with deflate, and the manifest holds each file's
//! SHA-256, checked before a restore reads it.
//!
//! The schema is versioned by [`FORMAT`]: a reader refuses a file whose `orderflow.format`
//! metadata names another version.

use std::{
    fs::File,
    io::{BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
    sync::LazyLock,
};

use apache_avro::{types::Value, Codec, DeflateSettings, Reader, Schema, Writer};
use sha2::{Digest, Sha256};

use crate::{BackupError, Result};

/// The version of the backup format: the record schema below and the manifest's layout.
pub const FORMAT: &str = "orderflow-backup/1";

/// The schema of one record in a partition file.
pub const RECORD_SCHEMA: &str = r#"{
  "type": "record",
  "name": "BackupRecord",
  "namespace": "orderflow.backup",
  "doc": "One Kafka record as it was in the log: its offset there, timestamp (ms), key, value and headers.",
  "fields": [
    {"name": "offset", "type": "long"},
    {"name": "timestamp", "type": ["null", "long"]},
    {"name": "key", "type": ["null", "bytes"]},
    {"name": "value", "type": ["null", "bytes"]},
    {"name": "headers", "type": {"type": "array", "items": {
      "type": "record", "name": "Header",
      "fields": [{"name": "key", "type": "string"}, {"name": "value", "type": ["null", "bytes"]}]
    }}}
  ]
}"#;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    #[allow(clippy::unwrap_used)] // a constant, parsed by a unit test
    Schema::parse_str(RECORD_SCHEMA).unwrap()
});

/// Metadata keys of a partition file.
const META_FORMAT: &str = "orderflow.format";
const META_TOPIC: &str = "orderflow.topic";
const META_PARTITION: &str = "orderflow.partition";

/// One record as the log held it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    /// The value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Replaces header `name`'s value (the first one of that name).
    pub fn set_header(&mut self, name: &str, value: &str) {
        if let Some(h) = self.headers.iter_mut().find(|(k, _)| k == name) {
            h.1 = Some(value.as_bytes().to_vec());
        }
    }

    fn to_avro(&self) -> Value {
        let optional_bytes = |b: &Option<Vec<u8>>| match b {
            Some(b) => Value::Union(1, Box::new(Value::Bytes(b.clone()))),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        Value::Record(vec![
            ("offset".into(), Value::Long(self.offset)),
            (
                "timestamp".into(),
                match self.timestamp {
                    Some(t) => Value::Union(1, Box::new(Value::Long(t))),
                    None => Value::Union(0, Box::new(Value::Null)),
                },
            ),
            ("key".into(), optional_bytes(&self.key)),
            ("value".into(), optional_bytes(&self.value)),
            (
                "headers".into(),
                Value::Array(
                    self.headers
                        .iter()
                        .map(|(k, v)| {
                            Value::Record(vec![
                                ("key".into(), Value::String(k.clone())),
                                ("value".into(), optional_bytes(v)),
                            ])
                        })
                        .collect(),
                ),
            ),
        ])
    }

    fn from_avro(value: Value) -> std::result::Result<Self, String> {
        let Value::Record(fields) = value else {
            return Err("a value that is not a record".into());
        };
        let mut record = Record {
            offset: -1,
            timestamp: None,
            key: None,
            value: None,
            headers: Vec::new(),
        };
        for (name, value) in fields {
            match (name.as_str(), value) {
                ("offset", Value::Long(o)) => record.offset = o,
                ("timestamp", v) => record.timestamp = optional_long(v)?,
                ("key", v) => record.key = optional_bytes(v)?,
                ("value", v) => record.value = optional_bytes(v)?,
                ("headers", Value::Array(items)) => {
                    for item in items {
                        let Value::Record(header) = item else {
                            return Err("a header that is not a record".into());
                        };
                        let mut key = None;
                        let mut value = None;
                        for (name, v) in header {
                            match (name.as_str(), v) {
                                ("key", Value::String(k)) => key = Some(k),
                                ("value", v) => value = optional_bytes(v)?,
                                (other, _) => return Err(format!("header field {other:?}")),
                            }
                        }
                        record
                            .headers
                            .push((key.ok_or("a header without a key")?, value));
                    }
                }
                (other, _) => return Err(format!("field {other:?} of an unexpected type")),
            }
        }
        if record.offset < 0 {
            return Err("a record without an offset".into());
        }
        Ok(record)
    }
}

fn optional_long(v: Value) -> std::result::Result<Option<i64>, String> {
    match v {
        Value::Union(_, inner) => optional_long(*inner),
        Value::Null => Ok(None),
        Value::Long(l) => Ok(Some(l)),
        other => Err(format!("expected a long or null, found {other:?}")),
    }
}

fn optional_bytes(v: Value) -> std::result::Result<Option<Vec<u8>>, String> {
    match v {
        Value::Union(_, inner) => optional_bytes(*inner),
        Value::Null => Ok(None),
        Value::Bytes(b) => Ok(Some(b)),
        other => Err(format!("expected bytes or null, found {other:?}")),
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_owned(),
        source,
    }
}

fn format_error(path: &Path, reason: impl ToString) -> BackupError {
    BackupError::Format {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Writes one partition's records, in log order, into a new file.
pub struct PartitionWriter {
    path: PathBuf,
    writer: Writer<'static, BufWriter<File>>,
    records: u64,
}

impl PartitionWriter {
    pub fn create(path: &Path, topic: &str, partition: i32) -> Result<Self> {
        let file = File::create(path).map_err(io_error(path))?;
        let mut writer = Writer::with_codec(
            &SCHEMA,
            BufWriter::new(file),
            Codec::Deflate(DeflateSettings::default()),
        );
        for (key, value) in [
            (META_FORMAT, FORMAT.to_owned()),
            (META_TOPIC, topic.to_owned()),
            (META_PARTITION, partition.to_string()),
        ] {
            writer
                .add_user_metadata(key.to_owned(), value)
                .map_err(|e| format_error(path, e))?;
        }
        Ok(Self {
            path: path.to_owned(),
            writer,
            records: 0,
        })
    }

    pub fn append(&mut self, record: &Record) -> Result<()> {
        self.writer
            .append_value_ref(&record.to_avro())
            .map_err(|e| format_error(&self.path, e))?;
        self.records += 1;
        Ok(())
    }

    /// Flushes and syncs the file; returns its record count.
    pub fn finish(self) -> Result<u64> {
        let path = self.path;
        let mut inner = self
            .writer
            .into_inner()
            .map_err(|e| format_error(&path, e))?;
        inner.flush().map_err(io_error(&path))?;
        let file = inner
            .into_inner()
            .map_err(|e| io_error(&path)(e.into_error()))?;
        file.sync_all().map_err(io_error(&path))?;
        Ok(self.records)
    }
}

/// Reads a partition file written by [`PartitionWriter`], checking its format, topic and
/// partition. Records come in the order they were written (log order).
pub fn read_partition(
    path: &Path,
    topic: &str,
    partition: i32,
) -> Result<impl Iterator<Item = Result<Record>>> {
    let file = File::open(path).map_err(io_error(path))?;
    let reader = Reader::new(BufReader::new(file)).map_err(|e| format_error(path, e))?;
    let meta = |key: &str| {
        reader
            .user_metadata()
            .get(key)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    if meta(META_FORMAT) != FORMAT {
        return Err(format_error(
            path,
            format!(
                "format {:?}, this release reads {FORMAT}",
                meta(META_FORMAT)
            ),
        ));
    }
    if meta(META_TOPIC) != topic || meta(META_PARTITION) != partition.to_string() {
        return Err(format_error(
            path,
            format!(
                "holds {}/{}, the manifest says {topic}/{partition}",
                meta(META_TOPIC),
                meta(META_PARTITION)
            ),
        ));
    }
    let path = path.to_owned();
    Ok(reader.map(move |value| {
        let value = value.map_err(|e| format_error(&path, e))?;
        Record::from_avro(value).map_err(|e| format_error(&path, e))
    }))
}

/// SHA-256 of a file, in hex, and its size.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64) -> Record {
        Record {
            offset,
            timestamp: (offset % 2 == 0).then_some(1_700_000_000_000 + offset),
            key: Some(format!("k{offset}").into_bytes()),
            value: (offset % 3 != 0).then(|| vec![0, 1, 2, offset as u8]),
            headers: vec![
                ("event_type".into(), Some(b"OrderPlaced".to_vec())),
                ("empty".into(), None),
            ],
        }
    }

    #[test]
    fn records_come_back_as_they_were_written_with_their_file_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("0.avro");
        let mut writer = PartitionWriter::create(&path, "orders.events", 3).expect("create");
        let written: Vec<Record> = [0, 1, 2, 5, 6, 9].into_iter().map(record).collect();
        for r in &written {
            writer.append(r).expect("append");
        }
        assert_eq!(writer.finish().expect("finish"), 6);
        let read: Vec<Record> = read_partition(&path, "orders.events", 3)
            .expect("open")
            .collect::<Result<_>>()
            .expect("read");
        assert_eq!(read, written);

        let wrong = read_partition(&path, "orders.events", 2)
            .err()
            .expect("refused");
        assert!(
            wrong.to_string().contains("holds orders.events/3"),
            "{wrong}"
        );

        let (sum, bytes) = sha256_file(&path).expect("sum");
        assert_eq!(sum.len(), 64);
        assert_eq!(bytes, std::fs::metadata(&path).expect("meta").len());
    }

    #[test]
    fn a_file_of_another_format_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("x.avro");
        std::fs::write(&path, b"not avro at all").expect("write");
        let error = read_partition(&path, "t", 0).err().expect("refused");
        assert!(error.to_string().contains("x.avro"), "{error}");
    }
}
