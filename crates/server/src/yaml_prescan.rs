//! A YAML document's flow depth (`[`, `{`) and a lower bound of its node
//! count, measured before serde_yaml parses it: libyaml's scanner
//! (unsafe-libyaml, under serde_yaml) looks at every open flow level for
//! every token, so 100 000 nested brackets (200 KB) cost it minutes, and
//! serde_yaml loads every event of the document (1 MiB of `[1,1,…]`: a third
//! of a second and 60 MiB in a release build) before its own limits apply.
//! Every service that reads YAML from someone else (campaign manifests,
//! LiteLLM configs) runs this first.
//!
//! This pass follows libyaml's scanner token by token as far as it decides
//! where flow collections open and close: quoted, plain and block scalars,
//! comments, anchors, tags and block indentation, so that brackets inside
//! scalars do not count. It builds nothing and looks at each character
//! once. Where libyaml would stop with an error, it goes on, which can only
//! count more levels than libyaml would reach, never fewer.

/// The bounds [`check`] applies; each service sets them from its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct YamlLimits {
    /// Deepest nesting of flow collections (`[`, `{`).
    pub max_depth: usize,
    /// Most nodes (scalars, collections, aliases) before aliases expand.
    pub max_nodes: usize,
}

/// Where the scan stopped (1-based) and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub line: usize,
    pub column: usize,
    pub past: Past,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Past {
    /// A flow collection nested deeper than `max_depth`.
    Depth,
    /// More than `max_nodes` scalars, collections and aliases: each is at
    /// least one node, so the document has more; refused here rather than
    /// after libyaml has loaded every event of a large document.
    Nodes,
}

impl Past {
    /// The [`YamlLimits`] field gone past.
    pub fn field(self) -> &'static str {
        match self {
            Self::Depth => "max_depth",
            Self::Nodes => "max_nodes",
        }
    }
}

/// Checks that no flow collection nests deeper than `limits.max_depth` and
/// that there are no more than `limits.max_nodes` nodes to be seen before
/// aliases expand. Linear in the text.
pub fn check(text: &str, limits: &YamlLimits) -> Result<(), Refused> {
    Scanner::new(text, limits.max_depth, limits.max_nodes).run()
}

/// libyaml's "simple key": a token that may turn out to be a mapping key
/// when a `:` follows. Only the one of the block context (flow level 0) is
/// kept: it decides the indentation of block mappings, which decides where
/// plain and block scalars end.
#[derive(Debug, Clone, Copy)]
struct SimpleKey {
    line: usize,
    column: usize,
    byte: usize,
}

struct Scanner {
    chars: Vec<char>,
    max_depth: usize,
    max_nodes: usize,
    nodes: usize,
    /// Position: index into `chars`, byte offset, 0-based line and column.
    at: usize,
    byte: usize,
    line: usize,
    column: usize,
    flow_level: usize,
    /// Column of the innermost block collection; -1 at the top.
    indent: isize,
    indents: Vec<isize>,
    simple_key_allowed: bool,
    block_key: Option<SimpleKey>,
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn is_break(c: char) -> bool {
    matches!(c, '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// A line break or the end of the text (read as `'\0'`, as libyaml does).
fn is_breakz(c: char) -> bool {
    is_break(c) || c == '\0'
}

fn is_blankz(c: char) -> bool {
    is_blank(c) || is_breakz(c)
}

fn is_alpha(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Characters of a tag after its handle (libyaml's URI characters).
fn is_tag_char(c: char) -> bool {
    is_alpha(c) || ";/?:@&=+$.%!~*'()".contains(c)
}

impl Scanner {
    fn new(text: &str, max_depth: usize, max_nodes: usize) -> Self {
        Self {
            // libyaml's reader refuses a NUL where it meets one and its
            // scanner reads `\0` as the end of the input, as every loop here
            // does: nothing past the first NUL is scanned (a NUL inside a
            // quoted or block scalar would otherwise never be stepped over).
            chars: text.chars().take_while(|&c| c != '\0').collect(),
            max_depth,
            max_nodes,
            nodes: 0,
            at: 0,
            byte: 0,
            line: 0,
            column: 0,
            flow_level: 0,
            indent: -1,
            indents: Vec::new(),
            simple_key_allowed: true,
            block_key: None,
        }
    }

    fn peek(&self, ahead: usize) -> char {
        self.chars.get(self.at + ahead).copied().unwrap_or('\0')
    }

    fn at_end(&self) -> bool {
        self.at >= self.chars.len()
    }

    fn skip(&mut self) {
        if let Some(c) = self.chars.get(self.at) {
            self.byte += c.len_utf8();
            self.at += 1;
            self.column += 1;
        }
    }

    fn skip_line(&mut self) {
        if self.peek(0) == '\r' && self.peek(1) == '\n' {
            self.at += 2;
            self.byte += 2;
        } else if is_break(self.peek(0)) {
            self.byte += self.peek(0).len_utf8();
            self.at += 1;
        } else {
            return;
        }
        self.line += 1;
        self.column = 0;
    }

    fn at_document_indicator(&self) -> bool {
        self.column == 0
            && (self.peek(0) == '-' && self.peek(1) == '-' && self.peek(2) == '-'
                || self.peek(0) == '.' && self.peek(1) == '.' && self.peek(2) == '.')
            && is_blankz(self.peek(3))
    }

    fn stop(&self, past: Past) -> Refused {
        Refused {
            line: self.line + 1,
            column: self.column + 1,
            past,
        }
    }

    fn run(mut self) -> Result<(), Refused> {
        loop {
            if self.nodes > self.max_nodes {
                return Err(self.stop(Past::Nodes));
            }
            self.scan_to_next_token();
            self.drop_stale_key();
            self.unroll_indent(self.column as isize);
            if self.at_end() {
                return Ok(());
            }
            let c = self.peek(0);
            let next = self.peek(1);
            if self.column == 0 && c == '%' {
                // A directive: its line is its own.
                self.unroll_indent(-1);
                self.block_key_removed();
                self.simple_key_allowed = false;
                while !is_breakz(self.peek(0)) {
                    self.skip();
                }
            } else if self.at_document_indicator() {
                self.unroll_indent(-1);
                self.block_key_removed();
                self.simple_key_allowed = false;
                (0..3).for_each(|_| self.skip());
            } else if c == '[' || c == '{' {
                self.save_key();
                self.flow_level += 1;
                self.nodes += 1;
                if self.flow_level > self.max_depth {
                    return Err(self.stop(Past::Depth));
                }
                self.simple_key_allowed = true;
                self.skip();
            } else if c == ']' || c == '}' {
                self.block_key_removed();
                self.flow_level = self.flow_level.saturating_sub(1);
                self.simple_key_allowed = false;
                self.skip();
            } else if c == ',' {
                self.block_key_removed();
                self.simple_key_allowed = true;
                self.skip();
            } else if c == '-' && is_blankz(next) {
                self.roll_indent(self.column as isize);
                self.block_key_removed();
                self.simple_key_allowed = true;
                self.skip();
            } else if c == '?' && (self.flow_level > 0 || is_blankz(next)) {
                self.roll_indent(self.column as isize);
                self.block_key_removed();
                self.simple_key_allowed = self.flow_level == 0;
                self.skip();
            } else if c == ':' && (self.flow_level > 0 || is_blankz(next)) {
                self.value();
            } else if c == '*' || c == '&' {
                self.nodes += usize::from(c == '*');
                self.save_key();
                self.simple_key_allowed = false;
                self.skip();
                while is_alpha(self.peek(0)) {
                    self.skip();
                }
            } else if c == '!' {
                self.save_key();
                self.simple_key_allowed = false;
                self.tag();
            } else if (c == '|' || c == '>') && self.flow_level == 0 {
                self.nodes += 1;
                self.block_key_removed();
                self.simple_key_allowed = true;
                self.block_scalar();
            } else if c == '\'' || c == '"' {
                self.nodes += 1;
                self.save_key();
                self.simple_key_allowed = false;
                self.quoted_scalar(c);
            } else if !(is_blankz(c) || "-?:,[]{}#&*!|>'\"%@`".contains(c))
                || c == '-' && !is_blank(next)
                || self.flow_level == 0 && (c == '?' || c == ':') && !is_blankz(next)
            {
                self.nodes += 1;
                self.save_key();
                self.simple_key_allowed = false;
                self.plain_scalar();
            } else {
                // libyaml stops here ("cannot start any token"); going on
                // can only see more, so the depth is not under-counted.
                self.skip();
            }
        }
    }

    fn scan_to_next_token(&mut self) {
        loop {
            if self.column == 0 && self.peek(0) == '\u{feff}' {
                self.skip();
            }
            while self.peek(0) == ' '
                || (self.flow_level > 0 || !self.simple_key_allowed) && self.peek(0) == '\t'
            {
                self.skip();
            }
            if self.peek(0) == '#' {
                while !is_breakz(self.peek(0)) {
                    self.skip();
                }
            }
            if !is_break(self.peek(0)) {
                return;
            }
            self.skip_line();
            if self.flow_level == 0 {
                self.simple_key_allowed = true;
            }
        }
    }

    /// libyaml forgets a possible simple key once the scanner is past its
    /// line or 1024 bytes on.
    fn drop_stale_key(&mut self) {
        if let Some(key) = self.block_key
            && (key.line < self.line || key.byte + 1024 < self.byte)
        {
            self.block_key = None;
        }
    }

    fn save_key(&mut self) {
        if self.flow_level == 0 && self.simple_key_allowed {
            self.block_key = Some(SimpleKey {
                line: self.line,
                column: self.column,
                byte: self.byte,
            });
        }
    }

    fn block_key_removed(&mut self) {
        if self.flow_level == 0 {
            self.block_key = None;
        }
    }

    /// A block collection starts (one more node) where the indentation deepens.
    fn roll_indent(&mut self, column: isize) {
        if self.flow_level == 0 && self.indent < column {
            self.nodes += 1;
            self.indents.push(self.indent);
            self.indent = column;
        }
    }

    fn unroll_indent(&mut self, column: isize) {
        if self.flow_level > 0 {
            return;
        }
        while self.indent > column {
            self.indent = self.indents.pop().unwrap_or(-1);
        }
    }

    /// `:` — in the block context a key before it opens a block mapping at
    /// the key's column.
    fn value(&mut self) {
        if self.flow_level == 0 {
            if let Some(key) = self.block_key.take() {
                self.roll_indent(key.column as isize);
                self.simple_key_allowed = false;
            } else {
                self.roll_indent(self.column as isize);
                self.simple_key_allowed = true;
            }
        } else {
            self.simple_key_allowed = false;
        }
        self.skip();
    }

    fn tag(&mut self) {
        self.skip();
        if self.peek(0) == '<' {
            // Verbatim: `!<uri>`, where `,[]` are URI characters too.
            self.skip();
            while is_tag_char(self.peek(0)) || ",[]".contains(self.peek(0)) {
                self.skip();
            }
            if self.peek(0) == '>' {
                self.skip();
            }
            return;
        }
        while is_alpha(self.peek(0)) {
            self.skip();
        }
        while is_tag_char(self.peek(0)) {
            self.skip();
        }
    }

    fn quoted_scalar(&mut self, quote: char) {
        let single = quote == '\'';
        self.skip();
        loop {
            if self.at_document_indicator() || self.at_end() {
                return;
            }
            while !is_blankz(self.peek(0)) {
                let c = self.peek(0);
                if single && c == '\'' && self.peek(1) == '\'' {
                    self.skip();
                    self.skip();
                } else if c == quote {
                    break;
                } else if !single && c == '\\' && is_break(self.peek(1)) {
                    self.skip();
                    self.skip_line();
                    break;
                } else if !single && c == '\\' {
                    self.skip();
                    self.skip();
                } else {
                    self.skip();
                }
            }
            if self.peek(0) == quote {
                self.skip();
                return;
            }
            while is_blank(self.peek(0)) || is_break(self.peek(0)) {
                if is_blank(self.peek(0)) {
                    self.skip();
                } else {
                    self.skip_line();
                }
            }
        }
    }

    fn plain_scalar(&mut self) {
        let indent = self.indent + 1;
        let mut leading_blanks = false;
        loop {
            if self.at_document_indicator() || self.peek(0) == '#' {
                break;
            }
            while !is_blankz(self.peek(0)) {
                let (c, next) = (self.peek(0), self.peek(1));
                if self.flow_level > 0 && c == ':' && ",?[]{}".contains(next) {
                    // libyaml stops here ("found unexpected ':'").
                    return;
                }
                if c == ':' && is_blankz(next) || self.flow_level > 0 && ",[]{}".contains(c) {
                    break;
                }
                leading_blanks = false;
                self.skip();
            }
            if !(is_blank(self.peek(0)) || is_break(self.peek(0))) {
                break;
            }
            while is_blank(self.peek(0)) || is_break(self.peek(0)) {
                if is_blank(self.peek(0)) {
                    self.skip();
                } else {
                    self.skip_line();
                    leading_blanks = true;
                }
            }
            if self.flow_level == 0 && (self.column as isize) < indent {
                break;
            }
        }
        if leading_blanks {
            self.simple_key_allowed = true;
        }
    }

    fn block_scalar(&mut self) {
        self.skip();
        let mut increment = 0;
        let mut header = |scanner: &mut Self| match scanner.peek(0) {
            '+' | '-' => scanner.skip(),
            c @ '1'..='9' => {
                increment = c as isize - '0' as isize;
                scanner.skip();
            }
            _ => {}
        };
        // Chomping and indentation indicators, in either order.
        header(self);
        header(self);
        while is_blank(self.peek(0)) {
            self.skip();
        }
        if self.peek(0) == '#' {
            while !is_breakz(self.peek(0)) {
                self.skip();
            }
        }
        if !is_breakz(self.peek(0)) {
            // libyaml stops here ("did not find expected comment or line break").
            return;
        }
        self.skip_line();
        let mut indent = if increment == 0 {
            0
        } else if self.indent >= 0 {
            self.indent + increment
        } else {
            increment
        };
        self.block_scalar_breaks(&mut indent);
        while self.column as isize == indent && !self.at_end() {
            while !is_breakz(self.peek(0)) {
                self.skip();
            }
            self.skip_line();
            self.block_scalar_breaks(&mut indent);
        }
    }

    /// Blank lines and the indentation of the next line; an undetermined
    /// indentation (0) becomes that of the first non-blank line.
    fn block_scalar_breaks(&mut self, indent: &mut isize) {
        let mut max_indent = 0;
        loop {
            while (*indent == 0 || (self.column as isize) < *indent) && self.peek(0) == ' ' {
                self.skip();
            }
            max_indent = max_indent.max(self.column as isize);
            if !is_break(self.peek(0)) {
                break;
            }
            self.skip_line();
        }
        if *indent == 0 {
            *indent = max_indent.max(self.indent + 1).max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_depth: usize, max_nodes: usize) -> YamlLimits {
        YamlLimits {
            max_depth,
            max_nodes,
        }
    }

    fn depth_ok(text: &str, max: usize) -> bool {
        check(text, &limits(max, usize::MAX)).is_ok()
    }

    #[test]
    fn counts_nested_flow_collections() {
        assert!(depth_ok("a: [[[1]]]\n", 3));
        assert!(!depth_ok("a: [[[1]]]\n", 2));
        assert!(!depth_ok("a: {b: {c: [d]}}\n", 2));
        assert_eq!(
            check("x: 1\nn: [[[[\n", &limits(2, usize::MAX)),
            Err(Refused {
                line: 2,
                column: 6,
                past: Past::Depth
            })
        );
        let bomb = format!("n: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        assert!(!depth_ok(&bomb, 32));
    }

    #[test]
    fn counts_nodes_as_at_most_the_document_has() {
        let nodes = |text: &str| {
            (0..)
                .find(|&max| check(text, &limits(64, max)).is_ok())
                .unwrap()
        };
        // The mapping, `a`, the list and its 3 items; a block list and 2 items.
        assert_eq!(nodes("a: [1, 'two', \"three\"]\n"), 6);
        assert_eq!(nodes("- x\n- |\n  text\n"), 3);
        // An alias is one node at least.
        assert_eq!(nodes("a: &x [1]\nb: *x\n"), 6);
        let dense = format!("n: [{}]\n", vec!["1"; 60_000].join(","));
        assert_eq!(
            check(&dense, &limits(32, 50_000)).unwrap_err().past,
            Past::Nodes
        );
    }

    #[test]
    fn sibling_collections_do_not_add_up() {
        let many = "a: [1, 2]\n".repeat(1000);
        assert!(depth_ok(&many, 1));
        assert!(depth_ok("a: [[1], [2], {b: [3]}]\n", 3));
        assert!(!depth_ok("a: [[1], [2], {b: [3]}]\n", 2));
    }

    #[test]
    fn brackets_inside_scalars_do_not_count() {
        // Quoted, with escapes and doubled quotes, across lines.
        assert!(depth_ok("a: [\"[[[\\\"[[\", '[[''[[', \"x\n  [[[\"]\n", 1));
        // Plain scalars, in the block context and continued on a deeper line.
        assert!(depth_ok("a: echo [[[ it's\n  [[[ more\nb: x[[[\n", 0));
        // Comments.
        assert!(depth_ok("a: 1 # [[[[\n# {{{{\n", 0));
        // Block scalars, whatever they hold, until a shallower line.
        let script = "run:\n  command:\n    - |\n      awk '{ [[[ {\n\n      }'\n    - >-\n      [[[\nb: [1]\n";
        assert!(depth_ok(script, 1));
        // Tags may hold `'`, which then quotes nothing.
        assert!(depth_ok("a: !x'y [1]\nb: [2]\n", 1));
    }

    #[test]
    fn a_nul_ends_the_scan() {
        // Inside quoted and block scalars, where it once looped forever.
        for text in [
            "a: \"x\0y\"\nb: [[[1]]]\n",
            "a: 'x\0y'\nb: [[[1]]]\n",
            "a: |\n  \0x\nb: [[[1]]]\n",
            "a: >-\n  x\n  \0\n",
        ] {
            assert!(depth_ok(text, 0), "{text:?}");
            assert!(
                serde_yaml::from_str::<serde_yaml::Value>(text).is_err(),
                "{text:?}"
            );
        }
        assert!(!depth_ok("b: [[[1]]]\na: \"\0\"\n", 2));
    }

    #[test]
    fn quotes_inside_plain_scalars_quote_nothing() {
        // A `'` in a plain scalar, on its line or continuing it, opens no
        // quoted scalar that could hide the brackets after it.
        assert!(!depth_ok("a: it's\nb: [[[[1]]]]\n", 3));
        assert!(!depth_ok("a: text\n  'x\nb: [[[[1]]]]\n", 3));
        assert!(!depth_ok("a: [x 'y, [[[1]]]]\n", 3));
        // And quoted closers close nothing.
        assert!(!depth_ok("a: [ ']' [ ']' [ ']' [ ']' ]\n", 3));
    }

    /// Tokens of random documents: no `- `, `? ` or aliases, so that a
    /// line adds at most one block level and nothing is copied.
    const TOKENS: &[&str] = &[
        "[", "]", "{", "}", ", ", ",", ": ", ":", "a", "b ", "'", "''", "\"", "\\", "#", " ", "\t",
        "\n", "\n  ", "\n    ", "&x ", "!t ", "|", ">", "%", "-", "---\n",
    ];

    fn value_depth(value: &serde_yaml::Value) -> usize {
        match value {
            serde_yaml::Value::Sequence(items) => {
                1 + items.iter().map(value_depth).max().unwrap_or(0)
            }
            serde_yaml::Value::Mapping(map) => {
                1 + map
                    .iter()
                    .map(|(k, v)| value_depth(k).max(value_depth(v)))
                    .max()
                    .unwrap_or(0)
            }
            serde_yaml::Value::Tagged(tagged) => value_depth(&tagged.value),
            _ => 0,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 512,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]

        /// Never fewer flow levels than libyaml opens: of what serde_yaml
        /// parses, the nesting is at most the flow depth seen here plus one
        /// block level per line.
        #[test]
        fn never_under_counts(tokens in proptest::collection::vec(proptest::sample::select(TOKENS), 0..48)) {
            let text = tokens.concat();
            if let Ok(value) = serde_yaml::from_str::<serde_yaml::Value>(&text) {
                let depth = value_depth(&value);
                let lines = text.lines().count().max(1);
                if depth > lines {
                    proptest::prop_assert!(
                        check(&text, &limits(depth - lines - 1, usize::MAX)).is_err(),
                        "{text:?} nests {depth} deep"
                    );
                }
            }
        }
    }
}
