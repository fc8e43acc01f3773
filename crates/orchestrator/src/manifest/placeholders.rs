//! `{{name}}` placeholders in the run's command and env: found, checked
//! against every configuration at submit, and filled in for each run.

use std::collections::{BTreeMap, BTreeSet};

use super::types::{ConfigPoint, RunTemplate};

/// Every placeholder of the run's command and env must have a value in
/// every configuration. The names are found once; a configuration is then
/// checked in time linear in its parameters (no name past its first missing
/// one is looked up), and only the first one missing a name is substituted
/// again to say which template lacks what.
pub(super) fn check(
    run: &RunTemplate,
    configs: &[ConfigPoint],
) -> Result<(), (&'static [&'static str], String)> {
    let templates = || {
        let command = run
            .command
            .iter()
            .map(|t| (&["run", "command"][..], "run.command", t));
        command.chain(
            run.env
                .values()
                .map(|t| (&["run", "env"][..], "run.env", t)),
        )
    };
    let mut needed = BTreeSet::new();
    let mut unclosed = false;
    for (_, _, template) in templates() {
        match placeholder_names(template) {
            Some(names) => needed.extend(names.filter(|n| {
                // Endpoints are checked against the deployments at submit.
                !BUILTIN_PLACEHOLDERS.contains(n) && !n.starts_with("endpoint.")
            })),
            None => unclosed = true,
        }
    }
    let lacking = |config: &&ConfigPoint| {
        needed
            .iter()
            .any(|name| !config.params.iter().any(|(key, _)| key == name))
    };
    let first_wrong = if unclosed {
        configs.first()
    } else {
        configs.iter().find(lacking)
    };
    let Some(config) = first_wrong else {
        return Ok(());
    };
    let mut values: BTreeMap<String, String> = config.params.iter().cloned().collect();
    for key in BUILTIN_PLACEHOLDERS {
        values.insert(key.into(), String::new());
    }
    for template in templates().map(|(_, _, t)| t) {
        for name in placeholder_names(template).into_iter().flatten() {
            if name.starts_with("endpoint.") {
                values.insert(name.to_string(), String::new());
            }
        }
    }
    for (path, field, template) in templates() {
        substitute(template, &values)
            .map_err(|e| (path, format!("{field} (config `{}`): {e}", config.name)))?;
    }
    Ok(())
}

/// Placeholders every run has, besides its configuration's parameters.
const BUILTIN_PLACEHOLDERS: [&str; 4] = ["config", "cycle", "backend", "run_id"];

/// The names of the `{{name}}` placeholders of `template`, as [`substitute`]
/// reads them; `None` when a `{{` is not closed.
pub(crate) fn placeholder_names(template: &str) -> Option<impl Iterator<Item = &str>> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let close = after.find("}}")?;
        names.push(after[..close].trim());
        rest = &after[close + 2..];
    }
    Some(names.into_iter())
}

/// Replaces `{{name}}` with its value. Single braces are literal, so shell
/// scripts and JSON need no escaping.
pub(crate) fn substitute(
    template: &str,
    values: &BTreeMap<String, String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| format!("unclosed `{{{{` in `{template}`"))?;
        let name = after[..close].trim();
        let value = values
            .get(name)
            .ok_or_else(|| format!("unknown placeholder `{{{{{name}}}}}` in `{template}`"))?;
        out.push_str(value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_braces_are_literal() {
        let values = BTreeMap::from([("n".to_string(), "3".to_string())]);
        assert_eq!(
            substitute("awk 'BEGIN { print {{n}} }'", &values).unwrap(),
            "awk 'BEGIN { print 3 }'"
        );
        assert!(substitute("{{n", &values).is_err());
    }
}
