//! The metering state of one body, fed by the SSE decoder or the JSON scanner.
//!
//! Flow: framing layers call the [`SseSink`] / [`JsonSink`] methods here;
//! this module routes each event or captured member to the dialect module
//! (`openai`, `anthropic`, `gemini`) that knows where that provider puts
//! usage, and keeps what they find: the latest usage, the first reported
//! model, terminal markers, in-band errors and a count of generated text.
//! The rules of "which usage wins" live in the dialect modules; this one only
//! holds state and the helpers they share.

use super::anthropic;
use super::gemini;
use super::json_scan::{JsonSink, Key};
use super::openai;
use super::sse::SseSink;
use super::strict_json::Walk;
use super::wire::{error_label, Count, SharedOpening};
use super::{Dialect, Usage};
use serde::Deserialize;

#[derive(Debug)]
pub(crate) struct Extractor {
    pub(crate) dialect: Dialect,
    pub(crate) usage: Option<Usage>,
    pub(crate) model: Option<String>,
    /// A terminal marker arrived (`[DONE]`, `message_stop`,
    /// `response.completed`/`.incomplete`, Ollama `done: true`).
    pub(crate) terminal: bool,
    pub(crate) failed: bool,
    pub(crate) provider_error: Option<String>,
    pub(crate) parse_error: bool,
    pub(crate) text_bytes: u64,
    /// Top-level JSON values completed (plain JSON bodies).
    pub(crate) json_values: u64,
    /// Gemini: a candidate reported `finishReason` (or the prompt was
    /// blocked), the closest thing to a terminator Gemini streams have.
    pub(crate) gemini_finished: bool,
    pub(crate) anthropic: anthropic::Fields,
    pub(crate) stray: gemini::Stray,
    /// Raw bytes of the latest Gemini `usageMetadata` seen in a stream,
    /// decoded by [`Extractor::settle`].
    gemini_usage: Option<Vec<u8>>,
    /// The opening bytes a dialect's most frequent events repeat, walked
    /// with one key predicate per dialect: OpenAI chat chunks, Anthropic
    /// content deltas.
    pub(crate) opening: SharedOpening,
}

impl Extractor {
    pub(crate) fn new(dialect: Dialect, max_stray_bytes: usize) -> Self {
        Extractor {
            dialect,
            usage: None,
            model: None,
            terminal: false,
            failed: false,
            provider_error: None,
            parse_error: false,
            text_bytes: 0,
            json_values: 0,
            gemini_finished: false,
            anthropic: anthropic::Fields::default(),
            stray: gemini::Stray::new(max_stray_bytes),
            gemini_usage: None,
            opening: SharedOpening::default(),
        }
    }

    /// Keeps the raw latest Gemini `usageMetadata` (see `gemini`).
    pub(crate) fn keep_gemini_usage(&mut self, raw: &[u8]) {
        let buf = self.gemini_usage.get_or_insert_with(Vec::new);
        buf.clear();
        buf.extend_from_slice(raw);
    }

    /// End of body: decodes state kept raw during the stream.
    pub(crate) fn settle(&mut self) {
        if let Some(raw) = self.gemini_usage.take() {
            if let Some(u) = self.read_usage(gemini::GemUsage::read_plain, &raw) {
                self.set_usage(u.to_usage());
            }
        }
    }

    /// A captured usage value (`null` or an object): read by the dialect's
    /// strict walk `read_plain`, or by serde_json when that declines it.
    fn read_usage<T: serde::de::DeserializeOwned>(
        &mut self,
        read_plain: fn(&[u8]) -> Option<Option<T>>,
        raw: &[u8],
    ) -> Option<T> {
        match read_plain(raw) {
            Some(usage) => usage,
            None => self.parse::<Option<T>>(raw, false).flatten(),
        }
    }

    /// Records the reported model: the first non-empty one wins (Azure's
    /// leading content-filter chunk reports `"model": ""`).
    pub(crate) fn set_model(&mut self, model: Option<&str>) {
        if self.model.is_none() {
            if let Some(m) = model.map(str::trim).filter(|m| !m.is_empty()) {
                self.model = Some(m.to_owned());
            }
        }
    }

    /// Latest reported usage wins; a usage object with no count in it does
    /// not erase an earlier one.
    pub(crate) fn set_usage(&mut self, usage: Option<Usage>) {
        if let Some(u) = usage {
            self.usage = Some(u);
        }
    }

    /// An in-band error. The first label is kept: later errors are usually
    /// consequences (Responses `error` then `response.failed`).
    pub(crate) fn fail(&mut self, label: Option<String>) {
        self.failed = true;
        if self.provider_error.is_none() {
            self.provider_error = label;
        }
    }

    pub(crate) fn add_text(&mut self, n: u64) {
        self.text_bytes = self.text_bytes.saturating_add(n);
    }

    /// Deserializes an event payload. A payload cut by the end of the stream
    /// (`at_eof`) that does not parse is the ordinary shape of a truncated
    /// stream, not a decoding error.
    pub(crate) fn parse<'a, T: Deserialize<'a>>(
        &mut self,
        data: &'a [u8],
        at_eof: bool,
    ) -> Option<T> {
        match serde_json::from_slice(data) {
            Ok(v) => Some(v),
            Err(_) => {
                if !at_eof {
                    self.parse_error = true;
                }
                None
            }
        }
    }

    fn ollama_count(&mut self, raw: &[u8], input: bool) {
        if let Some(Count(Some(n))) = self.parse::<Count>(raw, false) {
            let u = self.usage.get_or_insert_with(Usage::default);
            if input {
                u.input_tokens = Some(n);
            } else {
                u.output_tokens = Some(n);
            }
        }
    }
}

impl SseSink for Extractor {
    fn event(&mut self, name: &[u8], data: &[u8], at_eof: bool) {
        match self.dialect {
            Dialect::OpenAi => openai::sse_event(self, name, data, at_eof),
            Dialect::Anthropic => anthropic::sse_event(self, name, data, at_eof),
            Dialect::Gemini => gemini::sse_event(self, name, data, at_eof),
        }
    }

    fn stray_line(&mut self, line: &[u8]) {
        gemini::stray_line(self, line);
    }

    /// The event could not be read, so framing cannot be told from text:
    /// all of it counts as generated text, an upper bound in line with the
    /// estimate's (see `estimate`). Counting none of it would make a
    /// stream's text count hinge on which events reached the cap.
    fn oversized(&mut self, event_bytes: u64) {
        self.parse_error = true;
        self.add_text(event_bytes);
    }
}

impl JsonSink for Extractor {
    fn value(&mut self, key: Key, raw: &[u8]) {
        match key {
            Key::Usage => match self.dialect {
                Dialect::Anthropic => {
                    if let Some(u) = self.read_usage(anthropic::AnthUsage::read_plain, raw) {
                        self.anthropic.set(&u);
                        let usage = self.anthropic.to_usage();
                        self.set_usage(usage);
                    }
                }
                Dialect::OpenAi | Dialect::Gemini => {
                    if let Some(u) = self.read_usage(openai::OaUsage::read_plain, raw) {
                        self.set_usage(u.to_usage());
                    }
                }
            },
            Key::UsageMetadata => {
                if let Some(u) = self.read_usage(gemini::GemUsage::read_plain, raw) {
                    self.set_usage(u.to_usage());
                }
            }
            Key::Model | Key::ModelVersion => {
                // Borrowed when the string holds no escape (nearly always):
                // `set_model` copies what it keeps. Escapes go to serde_json.
                if let Some(m) = Walk::document(raw, |w| w.nullable(Walk::plain_string)) {
                    self.set_model(m);
                } else if let Some(m) = self.parse::<Option<String>>(raw, false) {
                    self.set_model(m.as_deref());
                }
            }
            Key::Error => {
                if let Some(v) = self.parse::<serde_json::Value>(raw, false) {
                    if let Some(label) = error_label(&v) {
                        self.fail(Some(label));
                    }
                }
            }
            Key::Type => {
                // Anthropic error envelope: {"type":"error","error":{...}}.
                if raw == b"\"error\"" {
                    self.fail(None);
                }
            }
            Key::Done => {
                if raw == b"true" {
                    self.terminal = true;
                }
            }
            Key::PromptEvalCount => self.ollama_count(raw, true),
            Key::EvalCount => self.ollama_count(raw, false),
        }
    }

    fn value_end(&mut self) {
        self.json_values = self.json_values.saturating_add(1);
    }

    fn text_bytes(&mut self, n: u64) {
        self.add_text(n);
    }

    fn malformed(&mut self) {
        self.parse_error = true;
    }

    fn wants(&self, key: Key) -> bool {
        match key {
            Key::Model | Key::ModelVersion => self.model.is_none(),
            _ => true,
        }
    }
}

/// `data` without surrounding ASCII whitespace.
pub(crate) fn trim(data: &[u8]) -> &[u8] {
    data.trim_ascii()
}
