//! A small JSON reader for the browser build: text into a [`Json`] tree, which
//! [`crate::wire::decode`] (a model spec, a plan) and the safetensors header codec read by
//! hand, and [`write_string`] for the header it writes.
//!
//! Why it exists: `serde_json`'s deserializer and serde's derives, monomorphised for every
//! type, were the largest part of the browser's WebAssembly module. Native crates keep
//! `serde_json`; tests compare the two on the same inputs.
//!
//! Numbers follow `serde_json` with its `float_roundtrip` feature (as the server builds
//! it): a non-negative integer is a `u64`, a negative one an `i64`, anything else (a
//! fraction, an exponent, an integer out of range) an `f64` parsed with correct rounding.
//! Nesting is limited to 128 levels, as in `serde_json`.

use std::fmt;

/// A parsed JSON value. Objects keep their keys in the order written.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A non-negative integer that fits a `u64`.
    U64(u64),
    /// A negative integer that fits an `i64`.
    I64(i64),
    /// Any other number.
    F64(f64),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Json>),
    /// An object, in the order written (duplicate keys are kept; a derive refuses them).
    Object(Vec<(String, Json)>),
}

/// Why JSON text could not be read or did not fit the type asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError(String);

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JsonError {}

impl JsonError {
    pub(crate) fn new(msg: String) -> Self {
        JsonError(msg)
    }
}

/// Deepest nesting of arrays and objects accepted.
const MAX_DEPTH: usize = 128;

/// Parses JSON text into a [`Json`] tree.
pub fn parse(text: &str) -> Result<Json, JsonError> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.error("trailing characters"));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> JsonError {
        JsonError(format!("{what} at byte {}", self.i))
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn literal(&mut self, word: &str, v: Json) -> Result<Json, JsonError> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(self.error("expected a value"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, JsonError> {
        self.ws();
        match self.peek() {
            None => Err(self.error("unexpected end")),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'"') => Ok(Json::String(self.string()?)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(open @ (b'[' | b'{')) => {
                if depth >= MAX_DEPTH {
                    return Err(self.error("nested too deeply"));
                }
                self.i += 1;
                let close = if open == b'[' { b']' } else { b'}' };
                let mut items = Vec::new();
                let mut fields = Vec::new();
                self.ws();
                if self.peek() == Some(close) {
                    self.i += 1;
                } else {
                    loop {
                        if open == b'[' {
                            items.push(self.value(depth + 1)?);
                        } else {
                            self.ws();
                            if self.peek() != Some(b'"') {
                                return Err(self.error("expected a key"));
                            }
                            let key = self.string()?;
                            self.ws();
                            if self.peek() != Some(b':') {
                                return Err(self.error("expected `:`"));
                            }
                            self.i += 1;
                            fields.push((key, self.value(depth + 1)?));
                        }
                        self.ws();
                        match self.peek() {
                            Some(b',') => self.i += 1,
                            Some(c) if c == close => {
                                self.i += 1;
                                break;
                            }
                            _ => return Err(self.error("expected `,` or a closing bracket")),
                        }
                    }
                }
                Ok(if open == b'[' {
                    Json::Array(items)
                } else {
                    Json::Object(fields)
                })
            }
            Some(_) => Err(self.error("expected a value")),
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<Json, JsonError> {
        let start = self.i;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        let int_start = self.i;
        match self.digits() {
            0 => return Err(self.error("invalid number")),
            n if n > 1 && self.s[int_start] == b'0' => {
                return Err(self.error("invalid number (leading zero)"))
            }
            _ => {}
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.i += 1;
            integer = false;
            if self.digits() == 0 {
                return Err(self.error("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            integer = false;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(self.error("invalid number"));
            }
        }
        // The slice is ASCII by construction.
        let text = std::str::from_utf8(&self.s[start..self.i]).unwrap_or_default();
        if integer {
            let magnitude = &text[usize::from(negative)..];
            if let Ok(u) = magnitude.parse::<u64>() {
                if !negative {
                    return Ok(Json::U64(u));
                }
                // As serde_json: -0 is a float, other negatives an i64 when they fit.
                if u != 0 && u <= i64::MAX as u64 + 1 {
                    return Ok(Json::I64((u as i64).wrapping_neg()));
                }
            }
        }
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Json::F64(f)),
            _ => Err(self.error("number out of range")),
        }
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let mut v = 0;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(c @ b'0'..=b'9') => c - b'0',
                Some(c @ b'a'..=b'f') => c - b'a' + 10,
                Some(c @ b'A'..=b'F') => c - b'A' + 10,
                _ => return Err(self.error("invalid \\u escape")),
            };
            v = v * 16 + u32::from(d);
            self.i += 1;
        }
        Ok(v)
    }

    /// A string, the opening quote under the cursor.
    fn string(&mut self) -> Result<String, JsonError> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let run = self.i;
            while let Some(c) = self.peek() {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.i += 1;
            }
            out.extend_from_slice(&self.s[run..self.i]);
            match self.peek() {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => {
                    self.i += 1;
                    // Whole UTF-8 sequences from the input and whole chars from escapes.
                    return String::from_utf8(out).map_err(|_| self.error("invalid UTF-8"));
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = self
                        .peek()
                        .ok_or_else(|| self.error("unterminated string"))?;
                    self.i += 1;
                    let ch = match c {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi) {
                                if !self.s[self.i..].starts_with(b"\\u") {
                                    return Err(self.error("lone surrogate in string"));
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(self.error("lone surrogate in string"));
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                hi
                            };
                            char::from_u32(code)
                                .ok_or_else(|| self.error("lone surrogate in string"))?
                        }
                        _ => return Err(self.error("invalid escape")),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                Some(_) => return Err(self.error("control character in string")),
            }
        }
    }
}

/// Appends `s` as a JSON string, escaped as `serde_json` escapes it.
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(HEX[(c as usize) >> 4] as char);
                out.push(HEX[(c as usize) & 15] as char);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_serde_json_reads_them() {
        let text = r#" {"a": [1, -2, 3.5, -0, 1e2, 18446744073709551616, true, null],
                        "b\u00e9\n": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00", "c": {}} "#;
        let v = parse(text).unwrap();
        let Json::Object(fields) = &v else {
            panic!("{v:?}")
        };
        assert_eq!(
            fields[0].1,
            Json::Array(vec![
                Json::U64(1),
                Json::I64(-2),
                Json::F64(3.5),
                Json::F64(-0.0),
                Json::F64(100.0),
                Json::F64(18446744073709551616.0),
                Json::Bool(true),
                Json::Null,
            ])
        );
        let reference: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(fields[1].0, "bé\n");
        assert_eq!(
            Json::String(reference["bé\n"].as_str().unwrap().into()),
            fields[1].1
        );
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\" 1}",
            "01",
            "1.",
            "-",
            "1e",
            "\"\\x\"",
            "\"\\ud800\"",
            "\"a\nb\"",
            "nul",
            "1 2",
            "1e999",
            &"[".repeat(200),
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
            assert!(
                serde_json::from_str::<serde_json::Value>(bad).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let s = "a\"b\\c\n\t\u{1}\u{8}\u{c}\r/é😀";
        let mut out = String::new();
        write_string(&mut out, s);
        assert_eq!(out, serde_json::to_string(s).unwrap());
        assert_eq!(parse(&out).unwrap(), Json::String(s.into()));
    }
}
