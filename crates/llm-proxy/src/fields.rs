//! Refusals that name the field: the Messages and Responses translations
//! deserialise requests part by part, and every refusal says where, as
//! `messages[2].content[0].tool_use_id` or `input[3].call_id`.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ProxyError;

pub fn invalid(path: impl Into<String>, message: impl ToString) -> ProxyError {
    ProxyError::InvalidField {
        field: path.into(),
        message: message.to_string(),
    }
}

/// Deserialises `value`, found at `at` (empty: the body), naming the path
/// of what does not fit.
pub fn typed<T: DeserializeOwned>(at: &str, value: Value) -> Result<T, ProxyError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = match (at.is_empty(), inner.as_str()) {
            (true, ".") => "(body)".to_string(),
            // A key that is the empty string.
            (true, "") => "\"\"".to_string(),
            (true, _) => inner,
            (false, ".") => at.to_string(),
            (false, _) => format!("{at}.{inner}"),
        };
        invalid(path, e.into_inner())
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // only its refusals are looked at
    struct Thing {
        a: Vec<u8>,
    }

    /// The empty key was found by the `messages` fuzz target: an unknown
    /// field `""` was refused with an empty field name.
    #[test]
    fn paths_name_the_field() {
        let field_of = |at: &str, value: Value| match typed::<Thing>(at, value) {
            Err(ProxyError::InvalidField { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field_of("", json!({"a": [1, "x"]})), "a[1]");
        assert_eq!(
            field_of("input[2]", json!({"a": [1, "x"]})),
            "input[2].a[1]"
        );
        assert_eq!(field_of("", json!({})), "(body)");
        assert_eq!(field_of("input[2]", json!({})), "input[2]");
        assert_eq!(field_of("", json!({"a": [], "": 1})), "\"\"");
    }
}
