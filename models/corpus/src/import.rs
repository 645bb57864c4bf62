//! Imports a site's own labelled notes from CSV (RFC 4180) or JSONL, validating each record and
//! naming the line and reason of every rejected one without ever repeating its text.
//!
//! Records are read as bytes and UTF-8 is checked per record, so one badly encoded row does not sink
//! the file. Nothing from a record — text, label value or other columns — appears in [`Reject`],
//! [`ImportReport`] or [`ImportError`]: reasons name only line numbers, counts, configured column and
//! label names, and positions.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use csv::ByteRecord;
use serde_json::Value;

/// The labels a site's notes are mapped to unless configured otherwise.
pub const DEFAULT_LABELS: [&str; 4] = ["doctor", "bed", "device", "other"];

/// Input format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// RFC 4180 CSV with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// How to read and validate a site's file.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportConfig {
    pub format: Format,
    /// CSV header name or JSON key of the note text.
    pub text_column: String,
    /// CSV header name or JSON key of the label.
    pub label_column: String,
    /// Accepted labels, as written to the output.
    pub labels: Vec<String>,
    /// Site label to accepted label, e.g. `Physician -> doctor`; applied before checking `labels`.
    pub label_map: BTreeMap<String, String>,
    /// Match labels and `label_map` keys ignoring ASCII case.
    pub case_insensitive_labels: bool,
    /// Longest accepted text, in characters (after trimming).
    pub max_chars: usize,
    /// Drop rows whose (text, label) repeats an earlier accepted row.
    pub dedupe: bool,
    /// Fail the import when more than this fraction of rows is rejected (0.0..=1.0).
    pub max_bad_fraction: Option<f64>,
    /// CSV field separator.
    pub delimiter: u8,
}

impl ImportConfig {
    /// `text`/`label` columns, the four default labels, 2000 characters, no dedupe, no failure threshold.
    pub fn new(format: Format) -> ImportConfig {
        ImportConfig {
            format,
            text_column: "text".to_owned(),
            label_column: "label".to_owned(),
            labels: DEFAULT_LABELS.iter().map(|s| (*s).to_owned()).collect(),
            label_map: BTreeMap::new(),
            case_insensitive_labels: true,
            max_chars: 2000,
            dedupe: false,
            max_bad_fraction: None,
            delimiter: b',',
        }
    }

    fn validate(&self) -> Result<(), ImportError> {
        let bad = |reason: String| Err(ImportError::BadConfig { reason });
        if self.text_column.is_empty() || self.label_column.is_empty() {
            return bad("text and label columns must be named".into());
        }
        if self.text_column == self.label_column {
            return bad("text and label columns must differ".into());
        }
        if self.labels.is_empty() || self.labels.iter().any(|l| l.trim().is_empty()) {
            return bad("at least one non-empty label is required".into());
        }
        if let Some(to) = self.label_map.values().find(|to| !self.labels.iter().any(|l| self.same_label(l, to))) {
            return bad(format!("label map target {to:?} is not one of the labels ({})", self.labels.join(", ")));
        }
        if let Some(f) = self.max_bad_fraction {
            if !(0.0..=1.0).contains(&f) {
                return bad(format!("max bad fraction must be within 0..=1, got {f}"));
            }
        }
        if self.max_chars == 0 {
            return bad("max chars must be positive".into());
        }
        if matches!(self.delimiter, b'"' | b'\r' | b'\n') || !self.delimiter.is_ascii() {
            return bad("delimiter must be an ASCII character other than a quote or newline".into());
        }
        Ok(())
    }

    fn same_label(&self, a: &str, b: &str) -> bool {
        if self.case_insensitive_labels {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    }

    /// The accepted label for a site's label value, if any.
    fn resolve(&self, raw: &str) -> Option<String> {
        let raw = raw.trim();
        let mapped = self.label_map.get(raw).map(String::as_str).or_else(|| {
            if self.case_insensitive_labels {
                self.label_map.iter().find(|(k, _)| k.trim().eq_ignore_ascii_case(raw)).map(|(_, v)| v.as_str())
            } else {
                None
            }
        });
        let candidate = mapped.unwrap_or(raw);
        self.labels.iter().find(|l| self.same_label(l, candidate)).cloned()
    }
}

/// What was wrong with a CSV record, beyond what the `csv` crate accepts.
///
/// The crate is lenient: text after a closing quote (`"a"b`) is kept as `ab`, a quote inside an
/// unquoted field is kept as data, and a quoted field left open runs to the end of the input,
/// taking every later line with it. Only the last two can be told from the parsed record, both by
/// an odd number of quote characters in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CsvFault {
    /// An odd number of quote characters: a stray quote, or a quoted field that is never closed.
    UnbalancedQuotes,
    /// The `csv` crate reported an error for the record. It reports none for byte records read
    /// from memory with `flexible` on; this keeps any future one a bad row rather than the end of
    /// the import.
    Unreadable,
}

impl fmt::Display for CsvFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CsvFault::UnbalancedQuotes => {
                "unbalanced quotes: a stray quote, or a quoted field never closed that runs to the end of the file"
            }
            CsvFault::Unreadable => "unreadable record",
        })
    }
}

/// Why a row was rejected. Carries positions and counts, never record content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    InvalidUtf8,
    MalformedJson {
        column: usize,
    },
    NotAnObject,
    MalformedCsv(CsvFault),
    FieldCount {
        expected: usize,
        got: usize,
    },
    MissingText,
    EmptyText,
    TextNotString,
    MissingLabel,
    LabelNotString,
    /// Lists the configured labels, not the value found.
    UnknownLabel {
        allowed: String,
    },
    TooLong {
        chars: usize,
        max: usize,
    },
}

/// The kind of a [`Reject`], for per-reason counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectKind {
    InvalidUtf8,
    MalformedJson,
    NotAnObject,
    MalformedCsv,
    FieldCount,
    MissingText,
    EmptyText,
    TextNotString,
    MissingLabel,
    LabelNotString,
    UnknownLabel,
    TooLong,
}

impl RejectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::InvalidUtf8 => "invalid-utf8",
            RejectKind::MalformedJson => "malformed-json",
            RejectKind::NotAnObject => "not-an-object",
            RejectKind::MalformedCsv => "malformed-csv",
            RejectKind::FieldCount => "field-count",
            RejectKind::MissingText => "missing-text",
            RejectKind::EmptyText => "empty-text",
            RejectKind::TextNotString => "text-not-string",
            RejectKind::MissingLabel => "missing-label",
            RejectKind::LabelNotString => "label-not-string",
            RejectKind::UnknownLabel => "unknown-label",
            RejectKind::TooLong => "too-long",
        }
    }
}

impl fmt::Display for RejectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Reject {
    pub fn kind(&self) -> RejectKind {
        match self {
            Reject::InvalidUtf8 => RejectKind::InvalidUtf8,
            Reject::MalformedJson { .. } => RejectKind::MalformedJson,
            Reject::NotAnObject => RejectKind::NotAnObject,
            Reject::MalformedCsv(_) => RejectKind::MalformedCsv,
            Reject::FieldCount { .. } => RejectKind::FieldCount,
            Reject::MissingText => RejectKind::MissingText,
            Reject::EmptyText => RejectKind::EmptyText,
            Reject::TextNotString => RejectKind::TextNotString,
            Reject::MissingLabel => RejectKind::MissingLabel,
            Reject::LabelNotString => RejectKind::LabelNotString,
            Reject::UnknownLabel { .. } => RejectKind::UnknownLabel,
            Reject::TooLong { .. } => RejectKind::TooLong,
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::InvalidUtf8 => f.write_str("invalid UTF-8"),
            Reject::MalformedJson { column } => write!(f, "malformed JSON (column {column})"),
            Reject::NotAnObject => f.write_str("malformed JSON (not an object)"),
            Reject::MalformedCsv(fault) => write!(f, "malformed CSV ({fault})"),
            Reject::FieldCount { expected, got } => write!(f, "wrong number of fields (expected {expected}, got {got})"),
            Reject::MissingText => f.write_str("missing text"),
            Reject::EmptyText => f.write_str("empty text"),
            Reject::TextNotString => f.write_str("text is not a string"),
            Reject::MissingLabel => f.write_str("missing label"),
            Reject::LabelNotString => f.write_str("label is not a string or integer"),
            Reject::UnknownLabel { allowed } => write!(f, "unknown label (not one of {allowed})"),
            Reject::TooLong { chars, max } => write!(f, "text too long ({chars} chars, max {max})"),
        }
    }
}

/// A rejected row: where it starts and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRow {
    /// 1-based line; for CSV the line the record starts on.
    pub line: usize,
    pub reason: Reject,
}

/// An exact duplicate dropped by `dedupe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DuplicateRow {
    pub line: usize,
    pub first_line: usize,
}

/// What an import read, kept and rejected. Holds no record text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportReport {
    /// Data records seen (CSV header and blank lines excluded).
    pub rows_read: usize,
    pub accepted: usize,
    pub rejected: usize,
    pub reasons: BTreeMap<RejectKind, usize>,
    /// Accepted rows per label, every configured label present.
    pub per_label: BTreeMap<String, usize>,
    pub rejects: Vec<RejectedRow>,
    pub duplicates: Vec<DuplicateRow>,
    /// Accepted rows whose text appeared earlier with a different label.
    pub conflicting_labels: usize,
}

impl ImportReport {
    /// Share of rows rejected; 0 when nothing was read.
    pub fn rejected_fraction(&self) -> f64 {
        if self.rows_read == 0 {
            0.0
        } else {
            self.rejected as f64 / self.rows_read as f64
        }
    }
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rows read {}, accepted {}, rejected {}, duplicates dropped {}, conflicting labels {}",
            self.rows_read,
            self.accepted,
            self.rejected,
            self.duplicates.len(),
            self.conflicting_labels
        )?;
        let labels: Vec<String> = self.per_label.iter().map(|(l, n)| format!("{l} {n}")).collect();
        writeln!(f, "labels: {}", labels.join(", "))?;
        if !self.reasons.is_empty() {
            let reasons: Vec<String> = self.reasons.iter().map(|(k, n)| format!("{k} {n}")).collect();
            writeln!(f, "rejected by reason: {}", reasons.join(", "))?;
        }
        for r in &self.rejects {
            writeln!(f, "line {}: {}", r.line, r.reason)?;
        }
        Ok(())
    }
}

/// A valid row. Its `Debug` shows the text's length, not the text.
#[derive(Clone, PartialEq, Eq)]
pub struct Row {
    pub line: usize,
    pub text: String,
    pub label: String,
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Row").field("line", &self.line).field("label", &self.label).field("text_chars", &self.text.chars().count()).finish()
    }
}

/// The valid rows and the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    pub rows: Vec<Row>,
    pub report: ImportReport,
}

/// Why an import could not run or was refused as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("bad import config: {reason}")]
    BadConfig { reason: String },
    #[error("no header row")]
    NoHeader,
    #[error("header row (line {line}): {fault}")]
    BadHeader { line: usize, fault: CsvFault },
    #[error("column {column:?} not in header")]
    MissingColumn { column: String },
    #[error("column {column:?} appears more than once in header")]
    DuplicateColumn { column: String },
    #[error("{} of {} rows rejected ({:.1}%), more than the allowed {:.1}%", report.rejected, report.rows_read, 100.0 * report.rejected_fraction(), 100.0 * max_fraction)]
    TooManyRejected { max_fraction: f64, report: Box<ImportReport> },
    /// Nothing to train on: an empty file, or every row rejected. Writing an empty
    /// training file would leave the site's agent with nothing to do, silently.
    #[error("no valid rows: {} rows read, {} rejected", report.rows_read, report.rejected)]
    NoRows { report: Box<ImportReport> },
}

/// Reads and validates a file.
pub fn import_file(path: &Path, cfg: &ImportConfig) -> Result<Imported, ImportError> {
    let bytes = std::fs::read(path).map_err(|error| ImportError::Io { path: path.to_owned(), error })?;
    import_bytes(&bytes, cfg)
}

/// Imports `input` and writes the valid rows as `{"text","label"}` JSONL to `output`.
pub fn import_to_jsonl(input: &Path, output: &Path, cfg: &ImportConfig) -> Result<ImportReport, ImportError> {
    let imported = import_file(input, cfg)?;
    let io_err = |error| ImportError::Io { path: output.to_owned(), error };
    let file = std::fs::File::create(output).map_err(io_err)?;
    let mut w = io::BufWriter::new(file);
    write_jsonl(&mut w, &imported.rows).map_err(io_err)?;
    w.flush().map_err(io_err)?;
    Ok(imported.report)
}

/// One `{"text": ..., "label": ...}` line per row.
pub fn write_jsonl(w: &mut impl Write, rows: &[Row]) -> io::Result<()> {
    for r in rows {
        let text = serde_json::to_string(&r.text).map_err(io::Error::other)?;
        let label = serde_json::to_string(&r.label).map_err(io::Error::other)?;
        writeln!(w, "{{\"text\":{text},\"label\":{label}}}")?;
    }
    Ok(())
}

/// Reads and validates file contents; pure.
pub fn import_bytes(input: &[u8], cfg: &ImportConfig) -> Result<Imported, ImportError> {
    cfg.validate()?;
    let input = input.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(input);
    let mut acc = Accumulator::new(cfg);
    match cfg.format {
        Format::Jsonl => read_jsonl(input, cfg, &mut acc),
        Format::Csv => read_csv(input, cfg, &mut acc)?,
    }
    let imported = acc.finish();
    if imported.rows.is_empty() {
        return Err(ImportError::NoRows { report: Box::new(imported.report) });
    }
    if let Some(max_fraction) = cfg.max_bad_fraction {
        if imported.report.rejected_fraction() > max_fraction {
            return Err(ImportError::TooManyRejected { max_fraction, report: Box::new(imported.report) });
        }
    }
    Ok(imported)
}

/// Collects accepted and rejected rows into the report.
struct Accumulator<'c> {
    cfg: &'c ImportConfig,
    rows: Vec<Row>,
    report: ImportReport,
    /// (text, label) -> first line, for dedupe.
    seen: HashMap<(String, String), usize>,
    /// text -> first label, for conflicts.
    first_label: HashMap<String, String>,
}

impl<'c> Accumulator<'c> {
    fn new(cfg: &'c ImportConfig) -> Self {
        let mut report = ImportReport::default();
        for l in &cfg.labels {
            report.per_label.insert(l.clone(), 0);
        }
        Accumulator { cfg, rows: Vec::new(), report, seen: HashMap::new(), first_label: HashMap::new() }
    }

    fn reject(&mut self, line: usize, reason: Reject) {
        self.report.rows_read += 1;
        self.report.rejected += 1;
        *self.report.reasons.entry(reason.kind()).or_default() += 1;
        self.report.rejects.push(RejectedRow { line, reason });
    }

    /// Checks decoded text and a raw label value; accepts or rejects the row.
    fn offer(&mut self, line: usize, text: &str, raw_label: &str) {
        let text = text.trim();
        if text.is_empty() {
            return self.reject(line, Reject::EmptyText);
        }
        let chars = text.chars().count();
        if chars > self.cfg.max_chars {
            return self.reject(line, Reject::TooLong { chars, max: self.cfg.max_chars });
        }
        if raw_label.trim().is_empty() {
            return self.reject(line, Reject::MissingLabel);
        }
        let Some(label) = self.cfg.resolve(raw_label) else {
            return self.reject(line, Reject::UnknownLabel { allowed: self.cfg.labels.join(", ") });
        };
        self.report.rows_read += 1;
        let key = (text.to_owned(), label.clone());
        if let Some(&first_line) = self.seen.get(&key) {
            if self.cfg.dedupe {
                self.report.duplicates.push(DuplicateRow { line, first_line });
                return;
            }
        } else {
            self.seen.insert(key, line);
        }
        match self.first_label.get(text) {
            Some(l) if *l != label => self.report.conflicting_labels += 1,
            Some(_) => {}
            None => {
                self.first_label.insert(text.to_owned(), label.clone());
            }
        }
        *self.report.per_label.entry(label.clone()).or_default() += 1;
        self.report.accepted += 1;
        self.rows.push(Row { line, text: text.to_owned(), label });
    }

    fn finish(self) -> Imported {
        Imported { rows: self.rows, report: self.report }
    }
}

fn read_jsonl(input: &[u8], cfg: &ImportConfig, acc: &mut Accumulator<'_>) {
    for (i, raw) in input.split(|b| *b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(s) = std::str::from_utf8(raw) else {
            acc.reject(line, Reject::InvalidUtf8);
            continue;
        };
        let value: Value = match serde_json::from_str(s) {
            Ok(v) => v,
            Err(e) => {
                acc.reject(line, Reject::MalformedJson { column: e.column() });
                continue;
            }
        };
        let Value::Object(obj) = value else {
            acc.reject(line, Reject::NotAnObject);
            continue;
        };
        let text = match obj.get(&cfg.text_column) {
            None | Some(Value::Null) => {
                acc.reject(line, Reject::MissingText);
                continue;
            }
            Some(Value::String(t)) => t,
            Some(_) => {
                acc.reject(line, Reject::TextNotString);
                continue;
            }
        };
        let label = match obj.get(&cfg.label_column) {
            None | Some(Value::Null) => {
                acc.reject(line, Reject::MissingLabel);
                continue;
            }
            Some(Value::String(l)) => l.clone(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(_) => {
                acc.reject(line, Reject::LabelNotString);
                continue;
            }
        };
        acc.offer(line, text, &label);
    }
}

fn read_csv(input: &[u8], cfg: &ImportConfig, acc: &mut Accumulator<'_>) -> Result<(), ImportError> {
    let mut records = CsvRecords::new(input, cfg.delimiter);
    let mut header = ByteRecord::new();
    match records.next(&mut header) {
        None => return Err(ImportError::NoHeader),
        Some((line, Err(fault))) => return Err(ImportError::BadHeader { line, fault }),
        Some((_, Ok(()))) => {}
    }
    let text_idx = column_index(&header, &cfg.text_column)?;
    let label_idx = column_index(&header, &cfg.label_column)?;
    let expected = header.len();
    let mut rec = ByteRecord::new();
    while let Some((line, sound)) = records.next(&mut rec) {
        if let Err(fault) = sound {
            acc.reject(line, Reject::MalformedCsv(fault));
            continue;
        }
        if rec.len() != expected {
            acc.reject(line, Reject::FieldCount { expected, got: rec.len() });
            continue;
        }
        let (Ok(text), Ok(label)) = (std::str::from_utf8(&rec[text_idx]), std::str::from_utf8(&rec[label_idx])) else {
            acc.reject(line, Reject::InvalidUtf8);
            continue;
        };
        // An empty field is a missing value; whitespace only is an empty text.
        if text.is_empty() {
            acc.reject(line, Reject::MissingText);
            continue;
        }
        acc.offer(line, text, label);
    }
    Ok(())
}

/// The header position of `name`: exact (after trimming) first, then a unique case-insensitive match.
fn column_index(header: &ByteRecord, name: &str) -> Result<usize, ImportError> {
    let trimmed: Vec<&[u8]> = header.iter().map(<[u8]>::trim_ascii).collect();
    let exact: Vec<usize> = trimmed.iter().enumerate().filter(|(_, h)| **h == name.as_bytes()).map(|(i, _)| i).collect();
    let hits = if exact.is_empty() {
        trimmed.iter().enumerate().filter(|(_, h)| h.eq_ignore_ascii_case(name.as_bytes())).map(|(i, _)| i).collect()
    } else {
        exact
    };
    match hits.as_slice() {
        [i] => Ok(*i),
        [] => Err(ImportError::MissingColumn { column: name.to_owned() }),
        _ => Err(ImportError::DuplicateColumn { column: name.to_owned() }),
    }
}

/// CSV records read by the `csv` crate, with what it leaves to us: the line each record starts on
/// and the quote check of [`CsvFault`]. Records end at CRLF, LF or a lone CR outside quotes; empty
/// lines are skipped; field counts are checked by the caller (`flexible`).
struct CsvRecords<'a> {
    input: &'a [u8],
    reader: csv::Reader<&'a [u8]>,
    /// Line breaks counted up to `counted`.
    counted: usize,
    line: usize,
    done: bool,
}

impl<'a> CsvRecords<'a> {
    fn new(input: &'a [u8], delimiter: u8) -> Self {
        let reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).delimiter(delimiter).from_reader(input);
        CsvRecords { input, reader, counted: 0, line: 1, done: false }
    }

    /// Reads the next record into `rec`: the line it starts on, and whether it can be used.
    fn next(&mut self, rec: &mut ByteRecord) -> Option<(usize, Result<(), CsvFault>)> {
        if self.done {
            return None;
        }
        let from = self.offset();
        let read = self.reader.read_byte_record(rec);
        let to = self.offset();
        // The reader's position (and so `ByteRecord::position`) is where the previous record ended:
        // skipped empty lines, and the LF of a CRLF, still lie ahead of this record. Its line count
        // also misses lone CRs. Lines are counted here from the byte offsets instead.
        let start = from + self.input[from..].iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
        let line = self.line_at(start);
        match read {
            Ok(false) => None,
            Ok(true) => {
                let quotes = self.input[start..to.max(start)].iter().filter(|b| **b == b'"').count();
                Some((line, if quotes % 2 == 0 { Ok(()) } else { Err(CsvFault::UnbalancedQuotes) }))
            }
            // The error is dropped unread: its message may quote the record. A reader that did not
            // move cannot get past it, so reading stops there.
            Err(_) => {
                self.done = to == from;
                Some((line, Err(CsvFault::Unreadable)))
            }
        }
    }

    /// The reader's byte offset into `input`.
    fn offset(&self) -> usize {
        usize::try_from(self.reader.position().byte()).map_or(self.input.len(), |b| b.min(self.input.len()))
    }

    /// The 1-based line of byte `at`, counting CRLF, LF and lone CR as one break each. `at` never
    /// decreases between calls and never falls between the CR and LF of a CRLF.
    fn line_at(&mut self, at: usize) -> usize {
        for (i, b) in self.input.get(self.counted..at).unwrap_or_default().iter().enumerate() {
            let next = self.input.get(self.counted + i + 1);
            if *b == b'\n' || (*b == b'\r' && next != Some(&b'\n')) {
                self.line += 1;
            }
        }
        self.counted = self.counted.max(at);
        self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "SECRET-7f3a";

    type Parsed = Result<(usize, Vec<String>), (usize, CsvFault)>;

    fn csv_records(input: &str) -> Vec<Parsed> {
        let mut records = CsvRecords::new(input.as_bytes(), b',');
        let mut rec = ByteRecord::new();
        let mut out = Vec::new();
        while let Some((line, sound)) = records.next(&mut rec) {
            out.push(
                sound.map(|()| (line, rec.iter().map(|f| String::from_utf8(f.to_vec()).unwrap()).collect())).map_err(|fault| (line, fault)),
            );
        }
        out
    }

    fn ok(line: usize, fields: &[&str]) -> Parsed {
        Ok((line, fields.iter().map(|s| (*s).to_owned()).collect()))
    }

    #[test]
    fn csv_reader_handles_rfc4180_quoting() {
        let input = "a,b,c\r\n\"x, y\",\"say \"\"hi\"\"\",\"\"\n\"multi\nline\r\nfield\",2,3\nplain,,\n,,";
        assert_eq!(
            csv_records(input),
            vec![
                ok(1, &["a", "b", "c"]),
                ok(2, &["x, y", "say \"hi\"", ""]),
                ok(3, &["multi\nline\r\nfield", "2", "3"]),
                ok(6, &["plain", "", ""]),
                ok(7, &["", "", ""]),
            ]
        );
    }

    #[test]
    fn csv_reader_skips_blank_lines_and_handles_endings() {
        assert_eq!(csv_records("a\n\n\r\nb\rc\n"), vec![ok(1, &["a"]), ok(4, &["b"]), ok(5, &["c"])]);
        // The crate's own positions would put "b" on line 1 and "c" on line 2 here.
        assert_eq!(csv_records("a\r\nb\r\n\r\nc\r\n"), vec![ok(1, &["a"]), ok(2, &["b"]), ok(4, &["c"])]);
        assert_eq!(csv_records("a\rb\r\"x\ry\"\rc"), vec![ok(1, &["a"]), ok(2, &["b"]), ok(3, &["x\ry"]), ok(5, &["c"])]);
        assert_eq!(csv_records("a,b\n1,2"), vec![ok(1, &["a", "b"]), ok(2, &["1", "2"])]);
        assert_eq!(csv_records("\"q\""), vec![ok(1, &["q"])]);
        assert_eq!(csv_records(""), vec![]);
        assert_eq!(csv_records("\n\r\n"), vec![]);
        // A trailing separator makes an empty last field; whitespace is data, not a blank line.
        assert_eq!(csv_records("a,\n \n"), vec![ok(1, &["a", ""]), ok(2, &[" "])]);
    }

    #[test]
    fn csv_reader_accepts_stray_quotes_the_crate_accepts_and_flags_odd_ones() {
        let input = "h1,h2\n\"bad\"x,1\nok,2\nun\"quo\"ted,3\nun\"quoted,4\n6\" cut,5\n\"open,6\nnever closed\nlast,7\n";
        assert_eq!(
            csv_records(input),
            vec![
                ok(1, &["h1", "h2"]),
                // Text after a closing quote, and paired quotes in an unquoted field, are kept as data.
                ok(2, &["badx", "1"]),
                ok(3, &["ok", "2"]),
                ok(4, &["un\"quo\"ted", "3"]),
                // A lone stray quote is data to the crate too, but reads like a broken row.
                Err((5, CsvFault::UnbalancedQuotes)),
                Err((6, CsvFault::UnbalancedQuotes)),
                // The open quote takes the rest of the file into this one record.
                Err((7, CsvFault::UnbalancedQuotes)),
            ]
        );
    }

    fn cfg(format: Format) -> ImportConfig {
        ImportConfig::new(format)
    }

    #[test]
    fn csv_import_names_line_and_reason_for_each_bad_row() {
        let mut c = cfg(Format::Csv);
        c.text_column = "note".into();
        c.label_column = "resource".into();
        c.max_chars = 40;
        let long = format!("{SECRET} {}", "x".repeat(60));
        let input = format!(
            "id,note,resource\n\
             1,\"needs CT head, GCS 13\",device\n\
             2,,bed\n\
             3,\"   \",bed\n\
             4,\"{SECRET} renal r/v\",\n\
             5,\"{SECRET} needs a bed\",{SECRET}-LABEL\n\
             6,\"{long}\",other\n\
             7,{SECRET} 6\" cut,doctor\n\
             8,only two\n\
             9,\"multi\nline {SECRET}\",Doctor\n"
        );
        let mut bytes = input.into_bytes();
        bytes.extend_from_slice(b"10,\"bad \xff byte\",bed\n");
        let out = import_bytes(&bytes, &c).unwrap();
        let got: Vec<(usize, RejectKind)> = out.report.rejects.iter().map(|r| (r.line, r.reason.kind())).collect();
        assert_eq!(
            got,
            vec![
                (3, RejectKind::MissingText),
                (4, RejectKind::EmptyText),
                (5, RejectKind::MissingLabel),
                (6, RejectKind::UnknownLabel),
                (7, RejectKind::TooLong),
                (8, RejectKind::MalformedCsv),
                (9, RejectKind::FieldCount),
                (12, RejectKind::InvalidUtf8),
            ]
        );
        assert_eq!(out.rows.len(), 2);
        assert_eq!((out.rows[0].line, out.rows[0].label.as_str()), (2, "device"));
        assert_eq!((out.rows[1].line, out.rows[1].label.as_str()), (10, "doctor"));
        assert_eq!(out.rows[1].text, format!("multi\nline {SECRET}"));
        assert_eq!(out.report.rows_read, 10);
        assert_eq!(out.report.rejected, 8);
        assert_eq!(out.report.reasons[&RejectKind::MissingText], 1);
        assert_eq!(out.report.per_label["device"], 1);
        assert_eq!(out.report.per_label["bed"], 0);
        let shown = format!("{}\n{:?}\n{:?}", out.report, out.report, out.rows);
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("line 6: unknown label (not one of doctor, bed, device, other)"), "{shown}");
        assert!(shown.contains("line 7: text too long"), "{shown}");
    }

    #[test]
    fn unterminated_quote_rejects_its_row_and_takes_the_rest_of_the_file() {
        let input = format!("text,label\nok,bed\n\"{SECRET} open,bed\nlater {SECRET},doctor\n\nlast,device\n");
        let out = import_bytes(input.as_bytes(), &cfg(Format::Csv)).unwrap();
        assert_eq!(out.report.rejects, vec![RejectedRow { line: 3, reason: Reject::MalformedCsv(CsvFault::UnbalancedQuotes) }]);
        assert_eq!((out.report.rows_read, out.report.accepted), (2, 1));
        let shown = format!("{}\n{:?}", out.report, out.report);
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("line 3: malformed CSV (unbalanced quotes"), "{shown}");
    }

    #[test]
    fn jsonl_import_names_line_and_reason_for_each_bad_row() {
        let mut c = cfg(Format::Jsonl);
        c.max_chars = 50;
        let lines = [
            format!(r#"{{"text": "needs ICU bed", "label": "bed", "site": "{SECRET}"}}"#),
            String::new(),
            format!(r#"{{"text": "{SECRET}", "label": "{SECRET}"}}"#),
            format!(r#"{{"label": "bed", "note": "{SECRET}"}}"#),
            r#"{"text": 12, "label": "bed"}"#.to_owned(),
            format!(r#"{{"text": "{SECRET} ok", "label": null}}"#),
            format!(r#"{{"text": "{SECRET} x", "label": ["bed"]}}"#),
            format!(r#"{{"text": "{SECRET} {}", "label": "other"}}"#, "y".repeat(60)),
            format!(r#"{{"text": "{SECRET} unterminated"#),
            format!(r#"["{SECRET}", "bed"]"#),
            r#"{"text": "  ", "label": "bed"}"#.to_owned(),
            r#"{"text": "Pharmacy pls", "label": "OTHER"}"#.to_owned(),
        ];
        let mut bytes = lines.join("\r\n").into_bytes();
        bytes.extend_from_slice(b"\n{\"text\": \"\xc3\x28 bad\", \"label\": \"bed\"}\n");
        let out = import_bytes(&bytes, &c).unwrap();
        let got: Vec<(usize, RejectKind)> = out.report.rejects.iter().map(|r| (r.line, r.reason.kind())).collect();
        assert_eq!(
            got,
            vec![
                (3, RejectKind::UnknownLabel),
                (4, RejectKind::MissingText),
                (5, RejectKind::TextNotString),
                (6, RejectKind::MissingLabel),
                (7, RejectKind::LabelNotString),
                (8, RejectKind::TooLong),
                (9, RejectKind::MalformedJson),
                (10, RejectKind::NotAnObject),
                (11, RejectKind::EmptyText),
                (13, RejectKind::InvalidUtf8),
            ]
        );
        assert_eq!(out.rows.iter().map(|r| (r.line, r.label.as_str())).collect::<Vec<_>>(), vec![(1, "bed"), (12, "other")]);
        let err_text = format!("{}{:?}", out.report, out.report);
        assert!(!err_text.contains(SECRET), "{err_text}");
    }

    #[test]
    fn label_mapping_and_numeric_labels() {
        let mut c = cfg(Format::Jsonl);
        c.label_map =
            [("Physician", "doctor"), ("ward bed", "bed"), ("0", "other")].into_iter().map(|(a, b)| (a.to_owned(), b.to_owned())).collect();
        let input = "{\"text\":\"a\",\"label\":\"Physician\"}\n{\"text\":\"b\",\"label\":\"physician\"}\n{\"text\":\"c\",\"label\":\" Ward Bed \"}\n{\"text\":\"d\",\"label\":0}\n{\"text\":\"e\",\"label\":\"Device\"}";
        let out = import_bytes(input.as_bytes(), &c).unwrap();
        let labels: Vec<&str> = out.rows.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(labels, vec!["doctor", "doctor", "bed", "other", "device"]);

        c.case_insensitive_labels = false;
        let out = import_bytes(input.as_bytes(), &c).unwrap();
        assert_eq!(out.report.rejects.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 3, 5]);

        let mut bad = cfg(Format::Jsonl);
        bad.label_map.insert("Nurse".into(), "nurse".into());
        assert!(matches!(import_bytes(b"", &bad), Err(ImportError::BadConfig { .. })));
    }

    #[test]
    fn dedupe_drops_exact_duplicates_and_counts_conflicts() {
        let mut c = cfg(Format::Csv);
        let input = "text,label\nneeds CT,device\nneeds CT,device\nneeds CT,doctor\n\" needs CT \",device\nother note,other\n";
        let out = import_bytes(input.as_bytes(), &c).unwrap();
        assert_eq!(out.rows.len(), 5);
        assert_eq!(out.report.conflicting_labels, 1);
        c.dedupe = true;
        let out = import_bytes(input.as_bytes(), &c).unwrap();
        assert_eq!(out.rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 4, 6]);
        assert_eq!(out.report.duplicates, vec![DuplicateRow { line: 3, first_line: 2 }, DuplicateRow { line: 5, first_line: 2 }]);
        assert_eq!(out.report.accepted, 3);
        assert_eq!(out.report.rows_read, 5);
    }

    #[test]
    fn too_many_bad_rows_fails_with_the_report() {
        let mut c = cfg(Format::Csv);
        c.max_bad_fraction = Some(0.25);
        let input = format!("text,label\nok,bed\n{SECRET},nope\nfine,doctor\n{SECRET},\n");
        let err = import_bytes(input.as_bytes(), &c).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("2 of 4 rows rejected (50.0%), more than the allowed 25.0%"), "{shown}");
        let ImportError::TooManyRejected { report, .. } = err else { panic!("wrong error") };
        assert_eq!(report.rejected, 2);
        c.max_bad_fraction = Some(0.5);
        assert!(import_bytes(input.as_bytes(), &c).is_ok());
    }

    #[test]
    fn header_problems_are_errors() {
        let c = cfg(Format::Csv);
        assert!(matches!(import_bytes(b"", &c), Err(ImportError::NoHeader)));
        assert!(matches!(import_bytes(b"note,label\nx,bed\n", &c), Err(ImportError::MissingColumn { column }) if column == "text"));
        assert!(import_bytes(b"text,Text,label\nx,x,bed\n", &c).is_ok());
        // A header and nothing else, or nothing valid: an error, never an empty file.
        assert!(matches!(import_bytes(b"text,label\n", &c), Err(ImportError::NoRows { .. })));
        assert!(matches!(import_bytes(b"text,label\n,bed\nnote,chair\n", &c), Err(ImportError::NoRows { report }) if report.rejected == 2));
        assert!(matches!(import_bytes(b"", &cfg(Format::Jsonl)), Err(ImportError::NoRows { .. })));
        assert!(matches!(import_bytes(b"TEXT,Text,label\n", &c), Err(ImportError::DuplicateColumn { .. })));
        assert!(matches!(
            import_bytes(b"\n\"text,label\n", &c),
            Err(ImportError::BadHeader { line: 2, fault: CsvFault::UnbalancedQuotes })
        ));
        // BOM and padded, case-different header names are fine.
        let out =
            import_bytes(b"\xEF\xBB\xBF Text ;LABEL\nneeds hoist;device\n", &ImportConfig { delimiter: b';', ..cfg(Format::Csv) }).unwrap();
        assert_eq!(out.rows[0].label, "device");
    }

    #[test]
    fn writes_jsonl_and_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("site.csv");
        std::fs::write(&input, "text,label\n\"quote \"\" and \\ slash\",bed\nbad,zzz\n").unwrap();
        let output = dir.path().join("out.jsonl");
        let report = import_to_jsonl(&input, &output, &cfg(Format::Csv)).unwrap();
        assert_eq!((report.accepted, report.rejected), (1, 1));
        let written = std::fs::read_to_string(&output).unwrap();
        assert_eq!(written, "{\"text\":\"quote \\\" and \\\\ slash\",\"label\":\"bed\"}\n");
        let back = import_bytes(written.as_bytes(), &cfg(Format::Jsonl)).unwrap();
        assert_eq!(back.rows[0].text, "quote \" and \\ slash");
        let missing = import_file(&dir.path().join("nope.csv"), &cfg(Format::Csv)).unwrap_err();
        assert!(missing.to_string().contains("nope.csv"));
    }
}
