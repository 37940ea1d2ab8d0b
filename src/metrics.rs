//! GET /metrics: the counters of [`Stats`] in Prometheus' text format (version 0.0.4),
//! every series prefixed `paheko_push_`, and the request-duration histogram the pushers
//! feed. Like /health it only reads atomics; nothing secret is in it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::stats::{BUCKETS, Stats};

/// The text exposition of `stats`.
pub fn render(stats: &Stats) -> String {
    let mut out = String::with_capacity(4096);
    let get = |a: &AtomicU64| a.load(Relaxed);
    family(
        &mut out,
        "events_total",
        "counter",
        "Events by what became of them.",
    );
    for (outcome, value) in [
        ("acked", get(&stats.delivered)),
        ("retried", get(&stats.retried)),
        ("dead_lettered", get(&stats.dead_lettered)),
        ("invalid", get(&stats.invalid)),
        ("lost_to_trim", get(&stats.lost_to_trim)),
    ] {
        let _ = writeln!(
            out,
            "paheko_push_events_total{{outcome=\"{outcome}\"}} {value}"
        );
    }

    family(
        &mut out,
        "held_sessions_total",
        "counter",
        "Answers of the plugin holding a cash session until the treasurer decides (status held).",
    );
    let _ = writeln!(
        out,
        "paheko_push_held_sessions_total {}",
        get(&stats.held_sessions)
    );

    family(
        &mut out,
        "request_duration_seconds",
        "histogram",
        "Duration of the HTTP requests to the plugin.",
    );
    let mut cumulative = 0;
    for (i, bound) in BUCKETS.iter().enumerate() {
        cumulative += get(&stats.request_duration.counts[i]);
        let _ = writeln!(
            out,
            "paheko_push_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    cumulative += get(&stats.request_duration.counts[BUCKETS.len()]);
    let _ = writeln!(
        out,
        "paheko_push_request_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
    );
    let sum = get(&stats.request_duration.sum_micros) as f64 / 1e6;
    let _ = writeln!(out, "paheko_push_request_duration_seconds_sum {sum}");
    let _ = writeln!(
        out,
        "paheko_push_request_duration_seconds_count {cumulative}"
    );

    let down_since = get(&stats.paheko_down_since);
    for (name, help, value) in [
        (
            "pending",
            "Entries read by the group and not acknowledged.",
            get(&stats.pending),
        ),
        (
            "backlog",
            "Entries in the stream the group has not read yet (XINFO GROUPS lag).",
            get(&stats.lag),
        ),
        (
            "oldest_pending_age_seconds",
            "Age of the oldest unacknowledged entry.",
            get(&stats.oldest_pending_age_seconds),
        ),
        (
            "parked",
            "Events waiting for their next attempt (backoff or Retry-After).",
            get(&stats.parked),
        ),
        (
            "held",
            "Entries held in memory: read, not yet acknowledged or dead-lettered.",
            get(&stats.held),
        ),
        (
            "held_bytes",
            "Bytes of the fields of the entries held in memory.",
            get(&stats.held_bytes),
        ),
        (
            "dead_letters",
            "Entries in the dead-letter stream.",
            get(&stats.dead_letters),
        ),
        (
            "consecutive_failures",
            "Failed requests since the last delivery.",
            get(&stats.consecutive_failures),
        ),
        (
            "last_success_timestamp_seconds",
            "Unix time of the last delivery, 0 for none.",
            get(&stats.last_success_at),
        ),
        (
            "paheko_up",
            "1 while the plugin takes tickets, 0 while the circuit breaker is open (down or refusing).",
            u64::from(down_since == 0),
        ),
        (
            "breaker_open",
            "1 while the circuit breaker is open.",
            u64::from(down_since != 0),
        ),
        (
            "paheko_refusing",
            "1 while the plugin refuses every ticket (401, 403, 404…): the secret or the URL needs fixing.",
            u64::from(get(&stats.paheko_refusing) != 0),
        ),
        (
            "redis_up",
            "1 while Redis answers both the reader and the acker.",
            u64::from(stats.redis_up()),
        ),
        (
            "active",
            "1 while this instance holds the lease and delivers, 0 for a standby.",
            u64::from(stats.active.load(Relaxed)),
        ),
        (
            "healthy",
            "1 while /health's status is ok.",
            u64::from(stats.status() == "ok"),
        ),
    ] {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "paheko_push_{name} {value}");
    }
    family(&mut out, "build_info", "gauge", "The running version.");
    let _ = writeln!(
        out,
        "paheko_push_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP paheko_push_{name} {help}");
    let _ = writeln!(out, "# TYPE paheko_push_{name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let stats = Stats::default();
        stats.request_duration.observe(Duration::from_millis(3));
        stats.request_duration.observe(Duration::from_millis(40));
        stats.request_duration.observe(Duration::from_secs(60));
        let text = render(&stats);
        assert!(
            text.contains("paheko_push_request_duration_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("paheko_push_request_duration_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("paheko_push_request_duration_seconds_bucket{le=\"30\"} 2\n"));
        assert!(text.contains("paheko_push_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("paheko_push_request_duration_seconds_count 3\n"));
        assert!(
            text.contains("paheko_push_request_duration_seconds_sum 60.043\n"),
            "{text}"
        );
    }

    #[test]
    fn every_sample_line_belongs_to_a_declared_family() {
        let text = render(&Stats::default());
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                declared.contains(&family) || declared.contains(&name),
                "{line}"
            );
            assert!(line.starts_with("paheko_push_"), "{line}");
        }
    }
}
