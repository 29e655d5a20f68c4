//! The limits every JSON value entering cairn meets, checked in Rust before
//! a value is sent (the SQL twin is `cairn.json_problem`): at most 1 MiB,
//! nested at most 64 levels. serde never writes a number outside the range
//! of a 64-bit float, so only SQL producers need that check.

/// The largest JSON value cairn accepts, in bytes.
pub(crate) const MAX_BYTES: usize = 1 << 20;

/// The deepest nesting cairn accepts (the worker's decoder allows 127).
pub(crate) const MAX_DEPTH: usize = 64;

/// What is wrong with a JSON text, if anything: `None` when it is within
/// the limits. One pass over the bytes; strings are skipped.
pub(crate) fn problem(json: &str) -> Option<String> {
    if json.len() > MAX_BYTES {
        return Some(format!("is {} bytes, above the 1 MiB limit", json.len()));
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(format!("is nested deeper than {MAX_DEPTH} levels"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Serializes JSON text held in a string as the JSON it is, not as a string
/// (`serialize_with` on a stored input or output).
pub(crate) fn embedded<S: serde::Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
    use serde::Serialize;
    match serde_json::value::RawValue::from_string(text.to_owned()) {
        Ok(raw) => raw.serialize(s),
        Err(_) => s.serialize_str(text),
    }
}

/// [`embedded`], for a value that may be absent (`null`).
pub(crate) fn embedded_opt<S: serde::Serializer>(
    text: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match text {
        Some(t) => embedded(t, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(problem(r#"{"a": [1, {"b": "]]]{{{"}]}"#), None);
        let deep = |n| "[".repeat(n) + &"]".repeat(n);
        assert_eq!(problem(&deep(MAX_DEPTH)), None);
        assert!(
            problem(&deep(MAX_DEPTH + 1))
                .unwrap()
                .contains("deeper than 64")
        );
        let escaped = format!("\"{}\\\"[[[\"", "x");
        assert_eq!(problem(&escaped), None);
        let big = format!("\"{}\"", "x".repeat(MAX_BYTES));
        assert!(problem(&big).unwrap().contains("above the 1 MiB limit"));
    }
}
