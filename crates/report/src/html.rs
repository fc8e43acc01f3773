//! The page around the plots: escaping, tables, sections and the one
//! stylesheet (inline: the file must read the same offline, printed, and
//! without any request leaving the browser).

use std::fmt::Write as _;

/// Text made safe for an HTML element or a quoted attribute.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// A table (no header row when `headers` is empty); cells are text (escaped
/// here). `class` marks a row (e.g. "flag").
pub fn table<'a>(
    headers: &[&str],
    rows: impl IntoIterator<Item = (Vec<String>, &'a str)>,
) -> String {
    let mut html = String::from("<table>");
    if !headers.is_empty() {
        html.push_str("<thead><tr>");
        for header in headers {
            let _ = write!(html, "<th>{}</th>", escape(header));
        }
        html.push_str("</tr></thead>");
    }
    html.push_str("<tbody>");
    for (cells, class) in rows {
        if class.is_empty() {
            html.push_str("<tr>");
        } else {
            let _ = write!(html, r#"<tr class="{class}">"#);
        }
        for cell in cells {
            let _ = write!(html, "<td>{}</td>", escape(&cell));
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>");
    html
}

/// A section with its heading and a short note under it saying how to read it.
pub fn section(id: &str, title: &str, note: &str, body: &str) -> String {
    format!(
        r#"<section id="{id}"><h2>{}</h2><p class="note">{}</p>{body}</section>"#,
        escape(title),
        escape(note)
    )
}

/// The whole document.
pub fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{}</title><style>{STYLE}</style></head><body>{body}</body></html>"#,
        escape(title)
    )
}

/// Colours from a palette that stays apart for the common colour-vision
/// deficiencies (Okabe–Ito); dots are round-capped zero-length strokes.
const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:16px 40px;color:#222;max-width:1140px}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:28px 0 4px;border-bottom:1px solid #ccc}
.note{color:#555;margin:2px 0 8px}.banner{background:#fff3cd;border:1px solid #e0c060;padding:8px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}tr.flag td{background:#fde8e8}tr.significant td{font-weight:600}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px;white-space:pre-wrap}
svg.plot{display:block;margin:8px 0;max-width:100%;height:auto;font:12px system-ui,sans-serif}
.plot-title{font-weight:600;font-size:13px}.tick{fill:#555;font-size:11px}.axis-label{fill:#222}.legend{font-size:12px}
.no-data{fill:#888;font-size:14px}.grid{stroke:#eee;fill:none}.axis{stroke:#444;fill:none}
.dot{stroke:#0072B2;stroke-width:5;stroke-linecap:round;opacity:.6}
.mean{stroke:#D55E00;stroke-width:3;fill:none}.ci{stroke:#D55E00;stroke-width:1.5;fill:none}
.run-ok{fill:#0072B2}.run-failed{fill:#D55E00}.run-cancelled{fill:#999}.run-warmup{fill:#E69F00}.run-retried{fill:none;stroke:#CC79A7;stroke-width:2}
.window{fill:#0072B2;opacity:.08}.baseline{stroke:#555;stroke-dasharray:4 3;fill:none}
.s0{stroke:#0072B2;fill:none}.s1{stroke:#009E73;fill:none}.s2{stroke:#D55E00;fill:none}.s3{stroke:#CC79A7;fill:none}
.front{stroke:#D55E00;stroke-width:2;fill:none}.front-dot{stroke:#D55E00;stroke-width:9;stroke-linecap:round}
.other-dot{stroke:#0072B2;stroke-width:7;stroke-linecap:round;opacity:.7}.point-label{font-size:11px;fill:#333}
@media print{body{margin:0}section{break-inside:avoid}svg.plot{max-width:100%}}
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
