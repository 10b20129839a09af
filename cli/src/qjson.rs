//! JSON as QEMU's tools print it (`qemu-img info --output=json`): four-space indentation,
//! `"key": value`, and empty objects and arrays opened and closed on separate lines.

use serde_json::Value;

/// `v` in QEMU's pretty layout (no trailing newline).
pub fn pretty(v: &Value) -> String {
    let mut s = String::new();
    write(&mut s, v, 0);
    s
}

fn pad(s: &mut String, level: usize) {
    for _ in 0..level {
        s.push_str("    ");
    }
}

fn write(s: &mut String, v: &Value, level: usize) {
    match v {
        Value::Object(m) => {
            s.push_str("{\n");
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    s.push_str(",\n");
                }
                pad(s, level + 1);
                s.push_str(&Value::String(k.clone()).to_string());
                s.push_str(": ");
                write(s, x, level + 1);
            }
            if !m.is_empty() {
                s.push('\n');
            }
            pad(s, level);
            s.push('}');
        }
        Value::Array(a) => {
            s.push_str("[\n");
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    s.push_str(",\n");
                }
                pad(s, level + 1);
                write(s, x, level + 1);
            }
            if !a.is_empty() {
                s.push('\n');
            }
            pad(s, level);
            s.push(']');
        }
        other => s.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn qemu_layout() {
        let v = serde_json::json!({"children": [], "a": {"b": 1, "c": {}}});
        assert_eq!(
            super::pretty(&v),
            "{\n    \"children\": [\n    ],\n    \"a\": {\n        \"b\": 1,\n        \"c\": {\n        }\n    }\n}"
        );
    }
}
