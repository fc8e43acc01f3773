//! The whole path from text to plan: expansion and order, errors at their
//! lines, and every limit refused before the work it bounds.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

const BASE: &str = "name: t
backends:
  - name: local
    runtime: process
grid:
  params:
    size: [1, 2]
    algo: [a, b]
run:
  command: [echo, '{{size}}', '{{ algo }}']
cycles: 2
";

#[test]
fn expands_grid_and_cycles() {
    let plan = plan("t.yaml", BASE).unwrap();
    let names: Vec<_> = plan.configs.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "size=1,algo=a",
            "size=1,algo=b",
            "size=2,algo=a",
            "size=2,algo=b"
        ]
    );
    assert_eq!(plan.runs.len(), 8);
    assert_eq!(plan.runs[4].cycle, 2);
    let run = &plan.runs[1];
    assert_eq!(
        plan.command_for(run, "id", &BTreeMap::new()),
        ["echo", "1", "b"]
    );
    assert_eq!(run.id("c1"), "c1/size=1,algo=b/local/1");
}

#[test]
fn grouped_shuffled_and_warmup_orders() {
    let grouped = plan("t", &format!("{BASE}order: grouped\nwarmup: {{runs: 1}}\n")).unwrap();
    let order: Vec<_> = grouped
        .runs
        .iter()
        .map(|r| (r.warmup, r.cycle, r.config.as_str()))
        .collect();
    assert_eq!(order[..5].iter().filter(|r| r.0).count(), 4);
    assert_eq!(order[4], (false, 1, "size=1,algo=a"));
    assert_eq!(order[5], (false, 2, "size=1,algo=a"));
    let a = plan("t", &format!("{BASE}order: shuffled\nseed: 7\n")).unwrap();
    let b = plan("t", &format!("{BASE}order: shuffled\nseed: 7\n")).unwrap();
    assert_eq!(a.runs, b.runs, "same seed, same order");
    let mut per_cycle: Vec<_> = a.runs[..4].iter().map(|r| r.config.clone()).collect();
    per_cycle.sort();
    assert_eq!(per_cycle.len(), 4, "each config once per cycle");
}

#[test]
fn exclude_and_include() {
    let text = BASE.replace(
        "run:",
        "  exclude: [{size: 2}]\n  include: [{size: 9, algo: z}]\nrun:",
    );
    let plan = plan("t", &text).unwrap();
    let names: Vec<_> = plan.configs.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["size=1,algo=a", "size=1,algo=b", "size=9,algo=z"]);
}

fn error(text: &str) -> ManifestError {
    plan("campaign.yaml", text).unwrap_err()
}

#[test]
fn malformed_yaml_has_file_line_column() {
    let e = error("name: t\nbackends: [\n");
    assert_eq!(e.source_name, "campaign.yaml");
    assert!(e.line >= 2, "{e}");
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let e = error(&BASE.replace(
        "    runtime: process",
        "    runtime: process\n    imagee: x",
    ));
    assert!(e.message.contains("imagee"), "{e}");
    assert_eq!(e.line, 5, "{e}");
}

#[test]
fn zero_cycles_and_empty_grid_rejected() {
    let e = error(&BASE.replace("cycles: 2", "cycles: 0"));
    assert!(e.message.contains("cycles"), "{e}");
    assert_eq!(e.line, 11);
    let e = error(&BASE.replace("    size: [1, 2]\n    algo: [a, b]\n", "    size: []\n"));
    assert!(e.message.contains("empty"), "{e}");
    let e = error(&BASE.replace(
        "  params:\n    size: [1, 2]\n    algo: [a, b]\n",
        "  params: {}\n",
    ));
    assert!(e.message.contains("empty grid"), "{e}");
}

#[test]
fn duplicate_config_name_rejected_with_line() {
    let text = "name: t\nbackends: [{name: l, runtime: process}]\nconfigs:\n  - name: fast\n  - name: fast\nrun: {command: [true]}\n";
    let e = error(text);
    assert!(e.message.contains("duplicate config name `fast`"), "{e}");
    assert_eq!(e.line, 5);
}

#[test]
fn unknown_placeholder_rejected() {
    let e = error(&BASE.replace("'{{ algo }}'", "'{{algorithm}}'"));
    assert!(e.message.contains("{{algorithm}}"), "{e}");
}

#[test]
fn power_rate_out_of_range_rejected() {
    let e = error(&format!("{BASE}power: {{enabled: true, rate_hz: 50000}}\n"));
    assert!(
        e.message.contains("power.rate_hz") && e.message.contains("50000"),
        "{e}"
    );
    let ok = plan(
        "t",
        &format!("{BASE}power:\n  enabled: true\n  rate_hz: 100\n  idle_baseline: 2s\n"),
    )
    .unwrap();
    assert_eq!(
        ok.manifest.power.idle_baseline,
        Some(Duration::from_secs(2))
    );
}

#[test]
fn a_host_baseline_period_needs_a_baseline_and_a_bound() {
    let with = |power: &str| format!("{BASE}power:\n  enabled: true\n{power}");
    for (power, expected) in [
        (
            "  idle_baseline_every: 10m\n",
            "power.idle_baseline_every: says how often the idle baseline is measured; set power.idle_baseline too",
        ),
        (
            "  idle_baseline: 2s\n  idle_baseline_every: 2days\n",
            "power.idle_baseline_every: 172800s must be above 0 and at most 86400s",
        ),
    ] {
        let e = error(&with(power));
        assert!(e.message.contains(expected), "{e}");
    }
    let ok = plan(
        "t",
        &with("  idle_baseline: 2s\n  idle_baseline_every: 10m\n"),
    )
    .unwrap();
    assert_eq!(
        ok.manifest.power.idle_baseline_every,
        Some(Duration::from_secs(600))
    );
}

#[test]
fn stable_warmup_plans_its_cap_and_defaults() {
    let plan = plan(
        "t",
        &format!("{BASE}warmup:\n  cv_below: 0.05\n  metric: tps\n  max_runs: 4\n"),
    )
    .unwrap();
    assert_eq!(
        plan.warmup,
        WarmupPolicy::UntilStable(StableWarmup {
            cv_below: 0.05,
            window: DEFAULT_STABLE_WINDOW,
            metric: "tps".into(),
            max_runs: 4,
        })
    );
    // 4 configs × (4 warmup runs planned up front + 2 cycles).
    assert_eq!(plan.runs.len(), 24);
    assert_eq!(plan.runs.iter().filter(|r| r.warmup).count(), 16);
    let defaults = super::plan("t", &format!("{BASE}warmup: {{cv_below: 0.1}}\n")).unwrap();
    match defaults.warmup {
        WarmupPolicy::UntilStable(stable) => {
            assert_eq!(stable.metric, "duration_s");
            assert_eq!(
                (stable.window, stable.max_runs),
                (DEFAULT_STABLE_WINDOW, DEFAULT_STABLE_CAP)
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn stable_warmup_example_is_valid() {
    let text = include_str!("../../../../examples/campaigns/stable-warmup.yaml");
    let plan = plan("stable-warmup.yaml", text).unwrap();
    assert!(matches!(plan.warmup, WarmupPolicy::UntilStable(_)));
}

#[test]
fn incoherent_stable_warmups_rejected_at_their_line() {
    // BASE has 11 lines; `warmup:` is line 12.
    let cases = [
        ("  cv_below: 0.05\n  runs: 2\n", 14, "warmup.runs"),
        (
            "  last: 3\n",
            13,
            "warmup.last: applies only with warmup.cv_below",
        ),
        ("  cv_below: 0\n", 13, "warmup.cv_below: 0 must be above 0"),
        ("  cv_below: 0.05\n  last: 1\n", 14, "at least 2 values"),
        (
            "  cv_below: 0.05\n  last: 5\n  max_runs: 4\n",
            15,
            "warmup.max_runs: 4 is fewer than warmup.last (5)",
        ),
        ("  cv_below: 0.05\n  metric: ''\n", 14, "warmup.metric"),
    ];
    for (warmup, line, expected) in cases {
        let e = error(&format!("{BASE}warmup:\n{warmup}"));
        assert!(e.message.contains(expected), "{warmup}: {e}");
        assert_eq!(e.line, line, "{warmup}: {e}");
    }
}

const CONTAINERS: &str = "name: t
backends:
  - name: small
    runtime: docker
    image: busybox
  - name: llm
    runtime: docker
    image: vllm
    placement:
      gpus: 2
      memory: 16GiB
    resources:
      cpus: 4
      memory: 32GiB
      memory_reservation: 8GiB
    gpus:
      count: all
    mounts:
      - {source: /models, target: /models, read_only: true}
configs: [{name: a}]
run: {command: [true]}
";

#[test]
fn placement_resources_gpus_and_mounts_parse() {
    let plan = plan("t", CONTAINERS).unwrap();
    let llm = plan.backend("llm").unwrap();
    assert_eq!(llm.placement.memory, Some(ByteSize(16 << 30)));
    assert_eq!(llm.resources.memory_reservation, Some(ByteSize(8 << 30)));
    assert_eq!(llm.gpus.as_ref().unwrap().count, Some(GpuCount::All));
    assert!(llm.mounts[0].read_only);
    assert_eq!((llm.gpus_needed(), llm.memory_needed()), (2, 16 << 30));
    let small = plan.backend("small").unwrap();
    assert_eq!((small.gpus_needed(), small.memory_needed()), (0, 0));
}

#[test]
fn bad_resources_rejected_at_the_backend_line() {
    // serde_yaml places a value's own errors at the start of its mapping.
    let cases = [
        ("memory: 16GiB", "memory: lots", 10, "invalid size `lots`"),
        ("count: all", "count: many", 17, "invalid GPU count `many`"),
        (
            "count: all",
            "count: 1\n      devices: ['0']",
            16,
            "backends[llm].gpus: give either count or devices",
        ),
        (
            "target: /models",
            "target: models",
            18,
            "must be an absolute path",
        ),
        (
            "cpus: 4",
            "cpus: -1",
            13,
            "backends[llm].resources.cpus: -1",
        ),
        (
            "memory_reservation: 8GiB",
            "memory_reservation: 64GiB",
            15,
            "above the memory limit",
        ),
    ];
    for (from, to, line, expected) in cases {
        let e = error(&CONTAINERS.replace(from, to));
        assert!(e.message.contains(expected), "{to}: {e}");
        assert_eq!(e.line, line, "{to}: {e}");
    }
    let e = error(&BASE.replace(
        "    runtime: process",
        "    runtime: process\n    mounts: [{source: /a, target: /a}]",
    ));
    assert!(
        e.message
            .contains("backends[local].mounts: the process runtime"),
        "{e}"
    );
    assert_eq!(e.line, 5, "{e}");
}

#[test]
fn work_metric_defaults_to_tokens() {
    assert_eq!(
        plan("t", BASE).unwrap().manifest.power.work_metric(),
        "tokens"
    );
    let custom = plan("t", &format!("{BASE}power: {{work_metric: images}}\n")).unwrap();
    assert_eq!(custom.manifest.power.work_metric(), "images");
    let e = error(&format!("{BASE}power:\n  work_metric: 'two words'\n"));
    assert_eq!(e.line, 13, "{e}");
}

#[test]
fn bad_runtime_value_named() {
    let e = error(&BASE.replace("runtime: process", "runtime: kubernetes"));
    assert!(e.message.contains("kubernetes"), "{e}");
}

/// A limit error: names the limit and its config field.
fn past(limits: &ManifestLimits, text: &str, limit: Limit) -> ManifestError {
    let e = plan_within("campaign.yaml", text, limits).unwrap_err();
    let field = format!("manifest.{}", limit.field());
    let env = format!("BERTH_MANIFEST__{}", limit.field().to_ascii_uppercase());
    assert!(
        e.message.contains(&field) && e.message.contains(&env),
        "{e}"
    );
    e
}

fn grid(params: usize, values: usize) -> String {
    let list: Vec<String> = (0..values).map(|v| v.to_string()).collect();
    let params: String = (0..params)
        .map(|p| format!("    p{p}: [{}]\n", list.join(", ")))
        .collect();
    BASE.replace("    size: [1, 2]\n    algo: [a, b]\n", &params)
        .replace("'{{size}}', '{{ algo }}'", "'{{p0}}'")
}

#[test]
fn grid_sizes_refused_before_expansion() {
    let limits = ManifestLimits::default();
    // The 408 bytes: 10^10 configurations, counted, not built.
    let e = past(&limits, &grid(10, 10), Limit::Configurations);
    assert!(e.message.contains("10000000000 configurations"), "{e}");
    assert_eq!((e.line, e.column), (6, 3), "{e}");
    // Past what a u64 holds.
    let e = past(&limits, &grid(30, 10), Limit::Configurations);
    assert!(e.message.contains("more than 18446744073709551615"), "{e}");
    // Within a raised limit, the same grid expands.
    let small = ManifestLimits {
        max_configurations: 3,
        ..ManifestLimits::default()
    };
    past(&small, BASE, Limit::Configurations);
    assert_eq!(plan_within("t", BASE, &limits).unwrap().configs.len(), 4);
}

#[test]
fn runs_counted_with_warmup_and_backends() {
    let limits = ManifestLimits {
        max_runs: 15,
        ..ManifestLimits::default()
    };
    // 4 configurations × 1 backend × (2 cycles + 2 warmup runs) = 16.
    let text = format!("{BASE}warmup: {{runs: 2}}\n");
    let e = past(&limits, &text, Limit::Runs);
    assert!(e.message.contains(": 16 runs; at most 15"), "{e}");
    let e = past(
        &ManifestLimits::default(),
        &BASE.replace("cycles: 2", "cycles: 4000000000"),
        Limit::Runs,
    );
    assert!(e.message.contains("16000000000 runs"), "{e}");
}

#[test]
fn size_depth_nodes_and_scalars_limited() {
    let limits = ManifestLimits::default();
    let big = format!("{BASE}description: '{}'\n", "x".repeat(2 << 20));
    let e = past(&limits, &big, Limit::Bytes);
    assert!(e.message.contains(&format!("{} bytes", big.len())), "{e}");

    // The 200 KB of brackets, refused where it gets too deep.
    let nested = format!("{BASE}n: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let e = past(&limits, &nested, Limit::Depth);
    assert_eq!((e.line, e.column), (12, 36), "{e}");
    // Block nesting is counted while the document is walked.
    let block: String = (0..40)
        .map(|i| format!("{}- \n", " ".repeat(i * 2)))
        .collect();
    past(&limits, &format!("{BASE}n:\n{block}"), Limit::Depth);

    // Aliases of aliases of a scalar: many jumps, few nodes.
    let nine = |name: &str| vec![format!("*{name}"); 9].join(", ");
    let laughs = format!(
        "    a: &a lol\n    b: &b [{}]\n    c: &c [{}]\n    d: &d [{}]\n    e: &e [{}]\n    f: [{}]\n",
        nine("a"),
        nine("b"),
        nine("c"),
        nine("d"),
        nine("e")
    );
    let bomb = BASE.replace("    algo: [a, b]\n", &laughs);
    // Past serde_yaml's own limit on following aliases before max_nodes.
    let e = error(&bomb);
    assert!(
        e.message
            .starts_with("YAML aliases: followed more than 100 times"),
        "{e}"
    );
    let few = ManifestLimits {
        max_nodes: 1000,
        ..ManifestLimits::default()
    };
    past(&few, &bomb, Limit::Nodes);

    let long = BASE.replace("[a, b]", &format!("[a, {}]", "b".repeat(70_000)));
    past(&limits, &long, Limit::ScalarBytes);
}

#[test]
fn names_and_exclude_comparisons_limited() {
    let limits = ManifestLimits::default();
    let long = BASE.replace("[a, b]", &format!("[a, {}]", "b".repeat(300)));
    let e = past(&limits, &long, Limit::ConfigNameBytes);
    assert!(e.message.contains("312 bytes"), "{e}");
    let include = BASE.replace(
        "    algo: [a, b]\n",
        &format!(
            "    algo: [a, b]\n  include:\n    - {{size: 3, algo: {}}}\n",
            "c".repeat(300)
        ),
    );
    past(&limits, &include, Limit::ConfigNameBytes);

    let few = ManifestLimits {
        max_exclude_checks: 7,
        ..ManifestLimits::default()
    };
    let excludes = BASE.replace(
        "    algo: [a, b]\n",
        "    algo: [a, b]\n  exclude:\n    - {size: 1}\n    - {algo: b}\n",
    );
    let e = past(&few, &excludes, Limit::ExcludeChecks);
    assert!(
        e.message
            .contains("2 entries × 4 combinations): 8 comparisons"),
        "{e}"
    );
    let plan = plan_within("t", &excludes, &limits).unwrap();
    let names: Vec<_> = plan.configs.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["size=2,algo=a"]);
}

#[test]
fn placeholders_checked_once_per_configuration() {
    // A placeholder only an include defines is missing from the grid's
    // configurations: the first of them is named.
    let text = BASE
        .replace("'{{ algo }}'", "'{{ algo }}', '{{extra}}'")
        .replace(
            "    algo: [a, b]\n",
            "    algo: [a, b]\n  include:\n    - {size: 3, extra: x}\n",
        );
    let e = error(&text);
    assert!(
        e.message
            .starts_with("run.command (config `size=1,algo=a`): unknown placeholder `{{extra}}`"),
        "{e}"
    );
    let e = error(&BASE.replace("'{{ algo }}'", "'{{ algo'"));
    assert!(e.message.contains("unclosed"), "{e}");
}

#[test]
fn non_scalar_values_named_not_printed() {
    let e = error(&BASE.replace("[a, b]", &format!("[a, [{}]]", vec!["x"; 1000].join(", "))));
    assert!(e.message.ends_with("found a list"), "{e}");
}

/// (line, column) of a refusal, with its message checked.
fn refused_at(text: &str, expected: &str) -> (usize, usize) {
    let e = error(text);
    assert!(e.message.contains(expected), "{e}");
    (e.line, e.column)
}

#[test]
fn an_error_in_the_second_of_two_alike_backends_points_at_the_second() {
    let text = "name: t
backends:
  - name: a
    runtime: docker
    image: x
    resources: {cpus: 2}
  - name: b
    runtime: docker
    image: x
    resources: {cpus: 0}
run:
  command: [echo]
";
    assert_eq!(refused_at(text, "backends[b].resources.cpus: 0"), (10, 17));
    // A backend without the key at fault: at the backend itself.
    let text = text.replace("    image: x\n    resources: {cpus: 0}\n", "");
    assert_eq!(refused_at(&text, "backends[b].image"), (7, 5));
    // The duplicate is the second of the two names, not a value alike elsewhere.
    let text = "name: a
backends:
  - {name: a, runtime: process}
  - {name: a, runtime: process}
run: {command: [echo]}
";
    assert_eq!(refused_at(text, "duplicate backend name `a`"), (4, 6));
}

#[test]
fn flow_style_manifests_get_real_positions() {
    let text = "{name: t, run: {command: [echo]}, backends: [{name: a, runtime: process}, {name: b, runtime: docker}]}\n";
    assert_eq!(refused_at(text, "backends[b].image"), (1, 75));
    let text = "name: t\nbackends: [{name: a, runtime: process}, {name: b, runtime: process, gpus: {count: 1}}]\nrun: {command: [echo]}\n";
    assert_eq!(refused_at(text, "backends[b].gpus"), (2, 69));
    let text =
        "name: t\ncycles: 0\nbackends: [{name: a, runtime: process}]\nrun: {command: [echo]}\n";
    assert_eq!(refused_at(text, "cycles: must be at least 1"), (2, 1));
}

#[test]
fn a_key_repeated_at_different_depths_is_found_at_its_own() {
    // `name` of a backend comes before the manifest's own; `cycles` of a
    // grid parameter before the top-level key.
    let text = "backends:
  - name: a
    runtime: process
grid:
  params:
    cycles: [1]
name: ' '
cycles: 0
run: {command: [echo]}
";
    assert_eq!(refused_at(text, "name: must not be empty"), (7, 1));
    let text = text.replace("name: ' '", "name: t");
    assert_eq!(refused_at(&text, "cycles: must be at least 1"), (8, 1));
    // Deeper: the backend's `cpus`, not the grid parameter named alike.
    let text = "name: t
grid:
  params:
    cpus: [1]
backends:
  - name: a
    runtime: docker
    image: x
    resources:
      cpus: -1
run: {command: [echo]}
";
    assert_eq!(refused_at(text, "resources.cpus: -1"), (10, 7));
}

#[test]
fn a_libvirt_backend_has_its_vm_and_nothing_else_does() {
    let with_vm = |backend: &str| {
        format!("name: t\nbackends:\n{backend}configs: [{{name: a}}]\nrun: {{command: [true]}}\n")
    };
    let good = with_vm(
        "  - name: vm\n    runtime: libvirt\n    vm:\n      vcpus: 2\n      memory: 256MiB\n      disks: [{image: /var/lib/berth/base.qcow2, size: 2GiB}]\n      network: none\n",
    );
    let plan = plan("t.yaml", &good).unwrap();
    let spec = plan.manifest.backends[0]
        .workload_spec(Default::default())
        .vm
        .expect("the VM");
    assert_eq!((spec.vcpus, spec.memory_bytes), (2, 256 << 20));
    assert_eq!(spec.disks[0].base_image, "/var/lib/berth/base.qcow2");
    assert_eq!(spec.disks[0].size_bytes, 2 << 30);
    assert_eq!(spec.network, "none");

    let cases = [
        (
            "  - name: vm\n    runtime: libvirt\n",
            "needs a `vm:` section",
            4,
        ),
        (
            "  - name: c\n    runtime: docker\n    image: i\n    vm: {memory: 256MiB, disks: [{image: /b.qcow2}]}\n",
            "only a `runtime: libvirt` backend runs a VM",
            6,
        ),
        (
            "  - name: vm\n    runtime: libvirt\n    vm:\n      memory: 256MiB\n      disks: [{image: /b.qcow2, volume: pool/v}]\n",
            "exactly one of `image`",
            7,
        ),
        (
            "  - name: vm\n    runtime: libvirt\n    vm:\n      memory: 256MiB\n      disks: [{image: b.qcow2}]\n",
            "must be an absolute path",
            7,
        ),
        (
            "  - name: vm\n    runtime: libvirt\n    vm:\n      memory: 1MiB\n      disks: [{image: /b.qcow2}]\n",
            "less than the 64 MiB",
            6,
        ),
        (
            "  - name: vm\n    runtime: libvirt\n    image: busybox\n    vm: {memory: 256MiB, disks: [{image: /b.qcow2}]}\n",
            "a VM boots its disks",
            5,
        ),
    ];
    for (backend, needle, line) in cases {
        let message = error(&with_vm(backend)).to_string();
        assert!(message.contains(needle), "{message}");
        assert!(
            message.contains(&format!("campaign.yaml:{line}:")),
            "{message}"
        );
    }
}

#[test]
fn a_slurm_backend_is_a_job_and_only_it_has_slurm_settings() {
    let text = include_str!("../../../../examples/campaigns/slurm.yaml");
    let plan = plan("slurm.yaml", text).unwrap();
    assert_eq!(plan.runs.len(), 20);
    let spec = plan.manifest.backends[0].workload_spec(Default::default());
    assert_eq!(spec.runtime, berth_proto::common::v1::Runtime::Slurm as i32);
    let job = spec.slurm.expect("the job's settings");
    assert_eq!(job.partition, "debug");
    assert_eq!(job.time_limit.map(|t| t.seconds), Some(30 * 60));
    assert_eq!(spec.resources.map(|r| r.memory_limit_bytes), Some(1 << 30));

    let with = |backend: &str| {
        format!("name: t\nbackends:\n{backend}configs: [{{name: a}}]\nrun: {{command: [true]}}\n")
    };
    let cases = [
        (
            "  - name: c\n    runtime: process\n    slurm: {partition: debug}\n",
            "backends[c].slurm: only a `runtime: slurm` backend",
            5,
        ),
        (
            "  - name: c\n    runtime: slurm\n    mounts: [{source: /scratch, target: /data}]\n",
            "backends[c].mounts: a job sees the nodes' files as they are",
            5,
        ),
        (
            "  - name: c\n    runtime: slurm\n    gpus: {count: 1}\n",
            "ask with slurm.gres",
            5,
        ),
        (
            "  - name: c\n    runtime: slurm\n    slurm:\n      time_limit: 0s\n",
            "backends[c].slurm.time_limit: must be positive",
            6,
        ),
    ];
    for (backend, needle, line) in cases {
        let message = error(&with(backend)).to_string();
        assert!(message.contains(needle), "{message}");
        assert!(
            message.contains(&format!("campaign.yaml:{line}:")),
            "{message}"
        );
    }
}

#[test]
fn the_slurm_arrays_example_is_valid() {
    let text = include_str!("../../../../examples/campaigns/slurm-arrays.yaml");
    let plan = plan("slurm-arrays.yaml", text).unwrap();
    assert_eq!(plan.runs.len(), 500);
    assert_eq!(plan.configs.len(), 50, "an array a cycle: 50 runs each");
    let array = plan.manifest.backends[0].array().expect("runs as arrays");
    assert_eq!((array.runs, array.parallel), (None, 8));
}

#[test]
fn a_slurm_array_is_refused_with_what_needs_a_run_s_own_moment() {
    let backend =
        "  - name: c\n    runtime: slurm\n    slurm:\n      array: {runs: 4, parallel: 2}\n";
    let with = |rest: &str| {
        format!(
            "name: t\nbackends:\n{backend}configs: [{{name: a}}, {{name: b}}]\nrun: {{command: [true]}}\n{rest}"
        )
    };
    let plan = plan("a.yaml", &with("cycles: 3\n")).unwrap();
    let array = plan.manifest.backends[0].array().expect("an array backend");
    assert_eq!((array.runs, array.parallel), (Some(4), 2));
    let spec = plan.manifest.backends[0].workload_spec(Default::default());
    assert_eq!(spec.slurm.unwrap().array_parallelism, 2);
    let cases = [
        (
            "power: {enabled: true}\n",
            "power cannot be measured per run",
        ),
        (
            "gaps: {between_cycles: 1s}\n",
            "gaps between runs need steps",
        ),
        ("failure: {retries: 1}\n", "failure.retries needs steps"),
        (
            "cycles: {min: 3, max: 9, until: {metric: ms, ci_below: 2%}}\n",
            "cycles until known",
        ),
    ];
    for (rest, needle) in cases {
        let message = error(&with(rest)).to_string();
        assert!(message.contains("backends[c].slurm.array: "), "{message}");
        assert!(message.contains(needle), "{message}");
        assert!(message.contains("campaign.yaml:6:"), "{message}");
    }
    let too_many = with("").replace("runs: 4", "runs: 1001");
    let message = error(&too_many).to_string();
    assert!(
        message.contains("backends[c].slurm.array.runs: must be 1 to 1000"),
        "{message}"
    );
    let command = with("").replace("runtime: slurm\n", "runtime: slurm\n    command: [x]\n");
    assert!(
        error(&command)
            .to_string()
            .contains("has no command of its own")
    );
}

#[test]
fn the_vm_example_is_valid() {
    let text = include_str!("../../../../examples/campaigns/in-a-vm.yaml");
    let plan = plan("in-a-vm.yaml", text).unwrap();
    assert_eq!(plan.runs.len(), 12);
    assert!(plan.manifest.backends[0].vm.is_some());
}

#[test]
fn cycles_until_known_plan_their_cap_and_read_percentages() {
    let text = BASE.replace(
        "cycles: 2",
        "cycles: {min: 3, max: 20, until: {metric: ms, ci_below: 2%}}",
    );
    let plan = plan("t.yaml", &text).unwrap();
    // 4 configs × 20 cycles planned; those an answer known earlier does not
    // need are dropped as the campaign runs.
    assert_eq!(plan.runs.len(), 80);
    let until = plan.manifest.cycles.until().unwrap();
    assert_eq!((until.min, until.max), (3, 20));
    assert!((until.until.ci_below.0 - 0.02).abs() < 1e-12);
    assert_eq!(plan.results_layout().cycles_until.as_ref(), Some(until));
    let fraction = BASE.replace(
        "cycles: 2",
        "cycles: {max: 5, until: {metric: ms, ci_below: 0.05}}",
    );
    let until = plan_of(&fraction);
    assert_eq!((until.min, until.max), (3, 5));
    assert!((until.until.ci_below.0 - 0.05).abs() < 1e-12);
}

fn plan_of(text: &str) -> crate::manifest::CyclesUntil {
    plan("t.yaml", text)
        .unwrap()
        .manifest
        .cycles
        .until()
        .cloned()
        .unwrap()
}

#[test]
fn contradictory_cycles_are_refused_at_their_line() {
    let with = |cycles: &str| BASE.replace("cycles: 2", cycles);
    let cases = [
        (
            with("cycles: {min: 3, max: 20, until: {ci_below: 2%}}"),
            "cycles.until.metric: the metric whose interval decides is needed",
        ),
        (
            with("cycles: {min: 3, max: 20, until: {metric: ms}}"),
            "missing field `ci_below`",
        ),
        (
            with("cycles: {min: 1, max: 20, until: {metric: ms, ci_below: 2%}}"),
            "cycles.min: 1: a confidence interval needs at least 2 values",
        ),
        (
            with("cycles: {min: 5, max: 4, until: {metric: ms, ci_below: 2%}}"),
            "cycles.max: 4 is below cycles.min (5)",
        ),
        (
            with("cycles: {min: 3, max: 9, until: {metric: ms, ci_below: 150%}}"),
            "cycles.until.ci_below: 1.5 must be above 0 and below 1",
        ),
        (
            with("cycles: {min: 3, max: 9, until: {metric: ms, ci_below: lots}}"),
            "`lots`: a percentage (`2%`) or a fraction (`0.02`)",
        ),
        (
            with("cycles: {min: 3, max: 9, until: {metric: energy_j, ci_below: 2%}}"),
            "cycles.until.metric: `energy_j` is measured only with power.enabled: true",
        ),
        (
            with("cycles: {min: 3, max: 9, until: {metric: joules_per_items, ci_below: 2%}}")
                + "power: {enabled: true}\n",
            "energy per unit of work is `joules_per_tokens` or `net_joules_per_tokens`",
        ),
        (
            with("cycles: {min: 3, max: 9, until: {metric: energy_net_j, ci_below: 2%}}")
                + "power: {enabled: true}\n",
            "`energy_net_j` is above the idle baseline: it needs power.idle_baseline",
        ),
        (
            with("cycles: {min: 3, max: 9, until: {metric: ms, ci_below: 2%}, often: yes}"),
            "unknown field `often`",
        ),
        (with("cycles: -2"), "-2 cycles: must be at least 1"),
    ];
    for (text, expected) in &cases {
        let (line, _) = refused_at(text, expected);
        assert_eq!(line, 11, "{expected}: {text}");
    }
    let measured = with("cycles: {min: 3, max: 9, until: {metric: energy_j, ci_below: 2%}}")
        + "power: {enabled: true}\n";
    assert!(plan("t.yaml", &measured).is_ok());
    let net =
        with("cycles: {min: 3, max: 9, until: {metric: net_joules_per_tokens, ci_below: 2%}}")
            + "power: {enabled: true, idle_baseline: 1s}\n";
    assert!(plan("t.yaml", &net).is_ok());
}

#[test]
fn the_until_known_example_plans_its_cap() {
    let text = include_str!("../../../../examples/campaigns/until-known.yaml");
    let plan = plan("until-known.yaml", text).unwrap();
    // 2 configs × (30 cycles + 1 warmup run).
    assert_eq!(plan.runs.len(), 62);
    assert_eq!(
        plan.manifest.cycles.until().unwrap().until.metric,
        "mib_per_s"
    );
}

#[test]
fn a_power_protocol_is_checked_with_its_line() {
    let with = |power: &str| BASE.replace("cycles: 2", "cycles: 2\n") + power;
    let good = with(
        "power:\n  enabled: true\n  protocol: {gap: {min: 50ms, max: 200ms}, phase_shift: 100ms, rise_time: 1s}\n",
    );
    let plan = plan("t.yaml", &good).unwrap();
    let protocol = plan.manifest.power.protocol.unwrap();
    assert_eq!(protocol.phase_shift, Some(Duration::from_millis(100)));
    let cases = [
        (
            with("power:\n  protocol: {rise_time: 1s}\n"),
            14,
            "power.protocol: applies only with power.enabled: true",
        ),
        (
            with("power:\n  enabled: true\n  protocol:\n    gap: {min: 2s, max: 1s}\n"),
            16,
            "power.protocol.gap.min:",
        ),
        (
            with("power:\n  enabled: true\n  protocol:\n    phase_shift: 0s\n"),
            16,
            "power.protocol.phase_shift: 0ns must be above 0",
        ),
        (
            with(
                "power:\n  enabled: true\n  protocol:\n    thermal_gate: {below_c: 200, max_wait: 1m}\n",
            ),
            16,
            "power.protocol.thermal_gate.below_c: 200 °C must be above 0 and under 150",
        ),
        (
            with(
                "power:\n  enabled: true\n  protocol:\n    thermal_gate: {below_c: 60, max_wait: 2h}\n",
            ),
            16,
            "power.protocol.thermal_gate.max_wait: 7200s must be above 0",
        ),
        (
            with("power:\n  enabled: true\n  protocol:\n    jitter: 1s\n"),
            16,
            "unknown field `jitter`",
        ),
    ];
    for (text, line, expected) in &cases {
        let (at, _) = refused_at(text, expected);
        assert_eq!(at, *line, "{expected}: {text}");
    }
}
