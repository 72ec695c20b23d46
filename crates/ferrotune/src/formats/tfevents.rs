//! TensorBoard event files (`events.out.tfevents.*`), written by hand: no Rust crate that
//! writes them is kept up (tensorboard-rs was last released in 2022 on protobuf 2), and
//! what a scalar log needs is small.
//!
//! A file is a sequence of TFRecords: `u64` length (little-endian), the masked CRC32C of
//! those 8 bytes, the data, the masked CRC32C of the data. Each record's data is an
//! `Event` protocol buffer (tensorflow/core/util/event.proto):
//!
//! ```text
//! Event   { double wall_time = 1; int64 step = 2;
//!           oneof { string file_version = 3; Summary summary = 5; SessionLog session_log = 6; } }
//! Summary { repeated Value value = 1; }
//! Value   { string tag = 1; float simple_value = 2; TensorProto tensor = 8;
//!           SummaryMetadata metadata = 9; }
//! TensorProto     { DataType dtype = 1; TensorShapeProto tensor_shape = 2; repeated bytes string_val = 8; }
//! SummaryMetadata { PluginData plugin_data = 1 { string plugin_name = 1; } }
//! SessionLog      { SessionStatus status = 1; }   // START = 1
//! ```
//!
//! The first record is `file_version = "brain.Event:2"`. Text (the plugin `text`) is a
//! string tensor. A `SessionLog START` at step `s` makes TensorBoard drop what earlier
//! files logged from step `s` on: a resumed run writes one, so the steps it replays are
//! not shown twice.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// CRC32C (Castagnoli) of `data`, as TFRecord uses it (before masking).
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: rotated right by 15 bits, plus a constant.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// A protocol-buffer message being encoded.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u32, wire: u8) {
        self.varint(((field as u64) << 3) | wire as u64);
    }
    fn int(&mut self, field: u32, v: i64) -> &mut Self {
        self.key(field, 0);
        self.varint(v as u64);
        self
    }
    fn double(&mut self, field: u32, v: f64) -> &mut Self {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn float(&mut self, field: u32, v: f32) -> &mut Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, field: u32, v: &[u8]) -> &mut Self {
        self.key(field, 2);
        self.varint(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
    fn msg(&mut self, field: u32, m: &Msg) -> &mut Self {
        self.bytes(field, &m.0)
    }
}

/// What one event holds besides its time and step.
enum What<'a> {
    FileVersion,
    Scalars(&'a [(String, f32)]),
    Text(&'a str, &'a str),
    SessionStart,
}

fn event(wall_time: f64, step: i64, what: What) -> Vec<u8> {
    let mut e = Msg::default();
    e.double(1, wall_time).int(2, step);
    match what {
        What::FileVersion => {
            e.bytes(3, b"brain.Event:2");
        }
        What::Scalars(values) => {
            let mut summary = Msg::default();
            for (tag, v) in values {
                let mut value = Msg::default();
                value.bytes(1, tag.as_bytes()).float(2, *v);
                summary.msg(1, &value);
            }
            e.msg(5, &summary);
        }
        What::Text(tag, text) => {
            let mut shape = Msg::default();
            shape.msg(2, Msg::default().int(1, 1)); // one dimension of size 1
            let mut tensor = Msg::default();
            tensor
                .int(1, 7) // DT_STRING
                .msg(2, &shape)
                .bytes(8, text.as_bytes());
            let mut plugin = Msg::default();
            plugin.bytes(1, b"text");
            let mut meta = Msg::default();
            meta.msg(1, &plugin);
            let mut value = Msg::default();
            value.bytes(1, tag.as_bytes()).msg(8, &tensor).msg(9, &meta);
            let mut summary = Msg::default();
            summary.msg(1, &value);
            e.msg(5, &summary);
        }
        What::SessionStart => {
            let mut log = Msg::default();
            log.int(1, 1);
            e.msg(6, &log);
        }
    }
    e.0
}

/// Seconds since the Unix epoch.
fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An event file being written; every event is flushed as it is written, so a crash
/// loses nothing logged before it.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if needed), named as TensorBoard's writers name
    /// theirs (`events.out.tfevents.<seconds>.<host>.<pid>.<n>`), starting with the file
    /// version. When `resumed_at` is a step, a `SessionLog START` there follows, so the
    /// steps after it that earlier files hold are dropped by TensorBoard.
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let t = now();
        let mut n = 0;
        let path = loop {
            let p = dir.join(format!(
                "events.out.tfevents.{}.{host}.{}.{n}",
                t as u64,
                std::process::id()
            ));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { file, path };
        w.write(&event(t, 0, What::FileVersion))?;
        if let Some(step) = resumed_at {
            w.write(&event(t, step as i64, What::SessionStart))?;
        }
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&record(event))
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Scalars (tag, value) at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(String, f32)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write(&event(now(), step as i64, What::Scalars(values)))
    }

    /// A text (Markdown, as TensorBoard's text plugin shows it) under `tag` at `step`.
    pub fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        self.write(&event(now(), step as i64, What::Text(tag, text)))
    }
}

/// The records of an event file: each record's data, the CRCs checked. For tests and
/// `ferrotune report`.
pub fn read_records(path: &Path) -> Result<Vec<Vec<u8>>> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let bad = |msg: &str| Error::file(path, format!("record at byte {at}: {msg}"));
        let head = data
            .get(at..at + 12)
            .ok_or_else(|| bad("truncated length"))?;
        let (len, crc) = head.split_at(8);
        if masked_crc(len).to_le_bytes() != crc {
            return Err(bad("length CRC does not match"));
        }
        let n = u64::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        let body = data
            .get(at + 12..at + 12 + n)
            .ok_or_else(|| bad("truncated data"))?;
        let crc = data
            .get(at + 12 + n..at + 16 + n)
            .ok_or_else(|| bad("truncated data CRC"))?;
        if masked_crc(body).to_le_bytes() != crc {
            return Err(bad("data CRC does not match"));
        }
        out.push(body.to_vec());
        at += 16 + n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // The CRC-32C check value (RFC 3720, B.4) and an iSCSI test vector.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn records_round_trip_and_corruption_is_found() {
        let t = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(t.path(), Some(7)).unwrap();
        w.scalars(
            3,
            &[
                ("train/loss".into(), 0.5),
                ("train/learning_rate".into(), 2e-5),
            ],
        )
        .unwrap();
        w.text(0, "recipe", "learning_rate = 2e-5").unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let recs = read_records(&path).unwrap();
        assert_eq!(recs.len(), 4);
        // The file version event: wall time (field 1), step 0, "brain.Event:2".
        assert!(recs[0].ends_with(b"\x1a\x0dbrain.Event:2"));
        // The scalars event holds each tag and each value's bytes.
        let s = &recs[2];
        assert!(s.windows(10).any(|w| w == b"train/loss"));
        assert!(s.windows(4).any(|w| w == 0.5f32.to_le_bytes()));
        assert!(s.windows(4).any(|w| w == 2e-5f32.to_le_bytes()));
        // One flipped byte is found.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = read_records(&path).unwrap_err().to_string();
        assert!(e.contains("data CRC does not match"), "{e}");
    }
}
