//! What parsing a request's JSON into a `serde_json::Value` tree costs,
//! counted before it is parsed. A tree takes far more memory than its text:
//! an object is a B-tree whose first entry allocates a node for eleven
//! (~640 bytes, for the 7 of `{"a":0}`), a value 32 bytes and more for the
//! array holding it, so 8 MiB of small objects would become ~700 MB. One
//! pass over the bytes, nothing allocated.

/// Bytes a parsed object costs at least: one B-tree leaf node.
const OBJECT_BYTES: usize = 640;
/// Bytes a parsed value costs, with the slack of the array or node holding it.
const VALUE_BYTES: usize = 64;

/// About the most memory that parsing `json` into a `Value` takes: its
/// bytes (the strings' contents), [`VALUE_BYTES`] per value or key and
/// [`OBJECT_BYTES`] per object. Bytes inside strings count only as bytes.
pub fn parsed_size(json: &[u8]) -> usize {
    let mut size = json.len();
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        // Every value or key follows one of these, or starts the text.
        size += match byte {
            b'"' => {
                in_string = true;
                0
            }
            b'{' => OBJECT_BYTES + VALUE_BYTES,
            b'[' | b',' | b':' => VALUE_BYTES,
            _ => 0,
        };
    }
    size + VALUE_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_objects_cost_far_more_than_their_text() {
        let objects = format!("[{}{{}}]", "{\"a\":0},".repeat(1000));
        assert!(parsed_size(objects.as_bytes()) > 1000 * OBJECT_BYTES);
        // Brackets and commas inside strings are text.
        let text = format!("{{\"input\":\"{}\\\"{}\"}}", "{[,:".repeat(1000), "]");
        assert_eq!(
            parsed_size(text.as_bytes()),
            text.len() + OBJECT_BYTES + 3 * VALUE_BYTES
        );
    }
}
