//! Values written with units or words in the YAML: sizes (`16GiB`) and GPU
//! counts (a number or `all`).

use std::fmt;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(try_from = "NumberOrText")]
pub enum GpuCount {
    Exactly(u32),
    /// Every GPU of the host.
    All,
}

/// A size in bytes, written as a number of bytes or with a unit:
/// `512MiB`, `16GiB`, `2GB` (powers of 1000), `1.5GiB`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(try_from = "NumberOrText")]
pub struct ByteSize(pub u64);

/// A YAML scalar that is either a whole number or text, parsed further by
/// `TryFrom`. Read by a visitor (not `untagged`) so that an error points at
/// the scalar's own line.
enum NumberOrText {
    Number(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for NumberOrText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = NumberOrText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number or text")
            }

            fn visit_u64<E>(self, n: u64) -> Result<NumberOrText, E> {
                Ok(NumberOrText::Number(n))
            }

            fn visit_str<E>(self, text: &str) -> Result<NumberOrText, E> {
                Ok(NumberOrText::Text(text.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl TryFrom<NumberOrText> for GpuCount {
    type Error = String;

    fn try_from(value: NumberOrText) -> Result<Self, String> {
        match value {
            NumberOrText::Number(n) => u32::try_from(n)
                .map(Self::Exactly)
                .map_err(|_| format!("{n} GPUs is too many")),
            NumberOrText::Text(text) if text == "all" => Ok(Self::All),
            NumberOrText::Text(text) => Err(format!(
                "invalid GPU count `{text}`: expected a number or `all`"
            )),
        }
    }
}

impl TryFrom<NumberOrText> for ByteSize {
    type Error = String;

    fn try_from(value: NumberOrText) -> Result<Self, String> {
        match value {
            NumberOrText::Number(n) => Ok(Self(n)),
            NumberOrText::Text(text) => parse_byte_size(&text).map(Self),
        }
    }
}

fn parse_byte_size(text: &str) -> Result<u64, String> {
    const UNITS: [(&str, u64); 9] = [
        ("B", 1),
        ("KB", 1000),
        ("MB", 1000_u64.pow(2)),
        ("GB", 1000_u64.pow(3)),
        ("TB", 1000_u64.pow(4)),
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("TiB", 1 << 40),
    ];
    let invalid = || {
        format!(
            "invalid size `{text}`: expected bytes or a number with a unit (KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
        )
    };
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim());
    let number: f64 = number.parse().map_err(|_| invalid())?;
    let multiplier = if unit.is_empty() {
        1
    } else {
        UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit))
            .map(|(_, m)| *m)
            .ok_or_else(invalid)?
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(invalid());
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(parse_byte_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_byte_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_byte_size("512"), Ok(512));
        assert!(parse_byte_size("16 parsecs").is_err());
        assert!(parse_byte_size("GiB").is_err());
    }
}
