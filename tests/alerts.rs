//! The Prometheus alert rules of deploy/prometheus (issue 10 §4): promtool accepts them
//! and their unit tests pass, and every metric an alert names is one a running worker
//! exports, so that no alert silently watches a series that never exists.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::packaging::output;
use super::util::*;

const T: Duration = Duration::from_secs(20);
const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
const RULES: &str = "paheko-push.rules.yml";
const RULE_TESTS: &str = "paheko-push.rules.test.yml";

/// `promtool ARGS` in deploy/prometheus: it must succeed; its output.
fn promtool(promtool: &Path, args: &[&str]) -> String {
    let out = output(Command::new(promtool).args(args).current_dir(DIR));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?}: {}\n{text}",
        out.status
    );
    text
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let Some(tool) = need("promtool", "prometheus") else {
        return;
    };
    let checked = promtool(&tool, &["check", "rules", RULES]);
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = promtool(&tool, &["test", "rules", RULE_TESTS]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(Path::new(DIR).join(RULES)).unwrap();
    let tests = std::fs::read_to_string(Path::new(DIR).join(RULE_TESTS)).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - exp_labels"
            )),
            "no test where {alert} fires"
        );
    }
}

/// The `paheko_push_…` names in the rules' expressions.
fn metrics_in_rules() -> BTreeSet<String> {
    let rules = std::fs::read_to_string(Path::new(DIR).join(RULES)).unwrap();
    let mut names = BTreeSet::new();
    let mut in_expr = false;
    for line in rules.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("expr:") {
            in_expr = true;
        } else if trimmed.ends_with(':') || trimmed.contains(": ") {
            in_expr = false;
        }
        if !in_expr {
            continue;
        }
        let mut rest = trimmed;
        while let Some(at) = rest.find("paheko_push_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

#[test]
fn every_metric_an_alert_names_is_exported_by_a_running_worker() {
    let names = metrics_in_rules();
    assert!(names.len() >= 8, "{names:?}");
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let worker = Worker::spawn(base_env(&redis, &sink));
    sink.wait_for_count(1, T);
    let (status, metrics) = worker.get("/metrics");
    assert_eq!(status, 200);
    let exported: BTreeSet<String> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = names.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the alert rules name metrics the worker does not export: {missing:?}\nexported: {exported:?}"
    );
    // A selector too (`events_total{outcome="lost_to_trim"}`): a series with those labels
    // must exist, or the alert watches nothing (issue 15 §9).
    for (name, labels) in selectors_in_rules() {
        assert!(
            metrics.lines().any(|l| l
                .strip_prefix(&name)
                .and_then(|rest| rest.strip_prefix('{'))
                .is_some_and(|rest| labels.iter().all(|label| rest.contains(label.as_str())))),
            "no series {name}{{{}}} in:\n{metrics}",
            labels.join(",")
        );
    }
}

/// Every `paheko_push_…{label="value",…}` selector in the rules' expressions, as the
/// metric name and its `label="value"` matchers.
fn selectors_in_rules() -> Vec<(String, Vec<String>)> {
    let rules = std::fs::read_to_string(Path::new(DIR).join(RULES)).unwrap();
    let mut found = Vec::new();
    for line in rules.lines().filter(|l| l.trim().starts_with("expr:")) {
        let mut rest = line;
        while let Some(at) = rest.find("paheko_push_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            if let Some(inner) = rest.strip_prefix('{').and_then(|r| r.split_once('}')) {
                let labels = inner.0.split(',').map(|m| m.trim().to_owned()).collect();
                found.push((name, labels));
            }
        }
    }
    assert!(found.len() >= 2, "selectors in the rules: {found:?}");
    found
}
