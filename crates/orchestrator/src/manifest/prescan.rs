//! The manifest's flow depth and node count, measured before serde_yaml
//! parses it, by the linear pre-scan every service shares
//! ([`berth_server::yaml_prescan`]), within the `[manifest]` limits.

pub(super) use berth_server::yaml_prescan::{Past, Refused, check};

#[cfg(test)]
mod tests {
    use berth_server::yaml_prescan::YamlLimits;

    use super::*;

    #[test]
    fn example_campaigns_are_shallow() {
        let limits = YamlLimits {
            max_depth: 2,
            max_nodes: usize::MAX,
        };
        for example in [
            include_str!("../../../../examples/campaigns/quickstart.yaml"),
            include_str!("../../../../examples/campaigns/stable-warmup.yaml"),
        ] {
            assert!(check(example, &limits).is_ok());
        }
    }
}
