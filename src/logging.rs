//! The JSON log line format: one object per event,
//! `{"timestamp":…,"level":…,<fields in order>,"target":…}`, the same shape
//! `tracing-subscriber`'s flattened JSON format writes.
//!
//! Written by hand because the per-call line is on every call's path:
//! `tracing-subscriber`'s JSON format serialises each field through
//! `serde_json` into a byte adaptor that re-validates UTF-8, and formats
//! every `%`/`?` value into a fresh `String` first. This writes the fields
//! straight into the line buffer, escaping as it goes (a quarter of the
//! instructions per line; see BENCHMARKS.md).
//!
//! [`StdoutBatch`] writes the lines to stdout in batches.

mod field_keys;
mod stdout_batch;

pub use stdout_batch::{StdoutBatch, StdoutBatchGuard, BATCH_WINDOW};

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::budget::civil_from_days;
use crate::usage::word_scan::json_escape;

/// Formats events as JSON lines (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        // The line is built in a local buffer (direct pushes) and handed to
        // the writer once, rather than many small writes through its
        // `dyn fmt::Write`.
        let mut line = String::with_capacity(512);
        line.push_str("{\"timestamp\":\"");
        push_timestamp(&mut line, std::time::SystemTime::now())?;
        line.push_str("\",\"level\":\"");
        line.push_str(meta.level().as_str());
        line.push('"');
        let mut fields = FieldWriter {
            line: &mut line,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        line.push_str(",\"target\":");
        push_str_value(&mut line, meta.target());
        line.push_str("}\n");
        writer.write_str(&line)
    }
}

/// Seconds from 1970 to the start of year 10000, past which RFC 3339 has no
/// four-digit year.
const YEAR_10000_SECS: u64 = 253_402_300_800;

/// Appends `now` in RFC 3339, UTC, with microseconds
/// (`2026-11-28T17:51:53.061840Z`): what `tracing-subscriber`'s
/// `SystemTime` writes, without going through `fmt` for every field.
fn push_timestamp(line: &mut String, now: std::time::SystemTime) -> fmt::Result {
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .filter(|d| d.as_secs() < YEAR_10000_SECS);
    let Some(since_epoch) = since_epoch else {
        // A clock before 1970 or past 9999: the general formatter.
        return SystemTime.format_time(&mut Writer::new(line));
    };
    let secs = since_epoch.as_secs();
    // Below year 10000, so the day count and year fit and are not negative.
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let second_of_day = secs % 86_400;
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut out[0..4], year.unsigned_abs());
    put_digits(&mut out[5..7], u64::from(month));
    put_digits(&mut out[8..10], u64::from(day));
    put_digits(&mut out[11..13], second_of_day / 3_600);
    put_digits(&mut out[14..16], second_of_day / 60 % 60);
    put_digits(&mut out[17..19], second_of_day % 60);
    put_digits(&mut out[20..26], u64::from(since_epoch.subsec_micros()));
    line.push_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?);
    Ok(())
}

/// Writes `n`'s last `out.len()` decimal digits into `out`, zero-padded.
fn put_digits(out: &mut [u8], mut n: u64) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Writes each field as `,"name":value`.
struct FieldWriter<'a> {
    line: &'a mut String,
    result: fmt::Result,
}

impl FieldWriter<'_> {
    /// Writes `,"name":` and says whether the value should follow.
    fn key(&mut self, field: &Field) -> bool {
        // Fields a `log` record carries are folded into the metadata above.
        self.result.is_ok() && field_keys::push_key(self.line, field.name())
    }

    fn integer(&mut self, field: &Field, value: impl itoa::Integer) {
        if self.key(field) {
            self.line.push_str(itoa::Buffer::new().format(value));
        }
    }
}

impl Visit for FieldWriter<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.key(field) {
            self.line.push('"');
            self.result = write!(Escaped(&mut *self.line), "{value:?}");
            self.line.push('"');
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field) {
            push_str_value(self.line, value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.integer(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.integer(field, value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.integer(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.integer(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.key(field) {
            self.line.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.key(field) {
            if value.is_finite() {
                self.result = write!(self.line, "{value}");
            } else {
                // JSON has no NaN or infinity; serde_json writes null.
                self.line.push_str("null");
            }
        }
    }
}

/// Appends `value` as a JSON string, quotes included.
fn push_str_value(line: &mut String, value: &str) {
    line.push('"');
    // Writing to a `String` cannot fail.
    let _ = Escaped(&mut *line).write_str(value);
    line.push('"');
}

/// Escapes what goes through it for the inside of a JSON string.
struct Escaped<W>(W);

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        let mut start = 0;
        while let Some(i) = json_escape(bytes, start) {
            let b = bytes[i];
            // Every escaped byte is ASCII, so these are char boundaries.
            self.0.write_str(&s[start..i])?;
            match b {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                b'\n' => self.0.write_str("\\n")?,
                b'\r' => self.0.write_str("\\r")?,
                b'\t' => self.0.write_str("\\t")?,
                0x08 => self.0.write_str("\\b")?,
                0x0c => self.0.write_str("\\f")?,
                _ => write!(self.0, "\\u{b:04x}")?,
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use serde_json::Value;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    /// Lines written by `emit` under the JSON-lines subscriber.
    fn lines(emit: impl FnOnce()) -> Vec<String> {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(capture.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = capture.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_call_line_has_every_field_in_order_with_its_json_type() {
        let cost = crate::money::Money::from_picos(146_800_000);
        let lines = lines(|| {
            tracing::info!(
                target: "tollgate::call",
                run_id = "run-1",
                release = %"v2",
                status = 200u16,
                streamed = false,
                prompt_tokens = Some(16u64),
                completion_tokens = None::<u64>,
                cost_usd = %cost,
                delta = -3i64,
                ratio = 0.5f64,
                "call"
            )
        });
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        let value: Value = serde_json::from_str(line).unwrap();
        let keys: Vec<&str> = line
            .split(",\"")
            .skip(1)
            .map(|part| part.split('"').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "level",
                "message",
                "run_id",
                "release",
                "status",
                "streamed",
                "prompt_tokens",
                "cost_usd",
                "delta",
                "ratio",
                "target"
            ]
        );
        assert!(line.starts_with("{\"timestamp\":\""), "{line}");
        let timestamp = value["timestamp"].as_str().unwrap();
        assert_eq!(
            timestamp.len(),
            "2026-11-28T17:51:53.061840Z".len(),
            "{timestamp}"
        );
        assert!(timestamp.ends_with('Z'));
        assert_eq!(value["level"], "INFO");
        assert_eq!(value["message"], "call");
        assert_eq!(value["run_id"], "run-1");
        assert_eq!(value["release"], "v2");
        assert_eq!(value["status"], 200);
        assert_eq!(value["streamed"], false);
        assert_eq!(value["prompt_tokens"], 16);
        assert_eq!(value["cost_usd"], "0.0001468");
        assert_eq!(value["delta"], -3);
        assert_eq!(value["ratio"], 0.5);
        assert_eq!(value["target"], "tollgate::call");
    }

    #[test]
    fn strings_are_escaped_whatever_they_hold() {
        let nasty = "quote \" backslash \\ newline \n tab \t nul \0 bell \x07 é ✓";
        let lines = lines(
            || tracing::warn!(text = nasty, shown = %nasty, debugged = ?nasty, "odd \"name\"\\" = 1, "msg \"{}\"", 1),
        );
        let value: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(value["odd \"name\"\\"], 1, "{}", lines[0]);
        assert_eq!(value["level"], "WARN");
        assert_eq!(value["text"], nasty);
        assert_eq!(value["shown"], nasty);
        assert_eq!(value["debugged"], format!("{nasty:?}"));
        assert_eq!(value["message"], "msg \"1\"");
    }

    fn timestamp(secs: u64, micros: u32) -> String {
        let at = std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(secs)
            + std::time::Duration::from_micros(u64::from(micros));
        let mut line = String::new();
        push_timestamp(&mut line, at).unwrap();
        line
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        for (secs, micros, text) in [
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (951_868_799, 500_000, "2000-02-29T23:59:59.500000Z"),
            (1_709_164_800, 1, "2024-02-29T00:00:00.000001Z"),
            (1_795_888_313, 61_840, "2026-11-28T17:51:53.061840Z"),
            (4_107_542_399, 0, "2100-02-28T23:59:59.000000Z"),
            (4_107_542_400, 0, "2100-03-01T00:00:00.000000Z"),
            (253_402_300_799, 999_999, "9999-12-31T23:59:59.999999Z"),
        ] {
            assert_eq!(timestamp(secs, micros), text);
        }
        // Past 9999 the general formatter takes over (with its own clock
        // reading), still a well-formed timestamp.
        let far = timestamp(YEAR_10000_SECS, 0);
        assert!(far.ends_with('Z') && far.len() >= 27, "{far}");
    }

    #[test]
    fn non_finite_floats_are_null() {
        let lines = lines(|| tracing::info!(x = f64::NAN, y = f64::INFINITY, "m"));
        let value: Value = serde_json::from_str(&lines[0]).unwrap();
        assert!(value["x"].is_null() && value["y"].is_null());
    }
}
