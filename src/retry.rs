//! The retry policy: which answers are worth another try, how long to wait before it,
//! and when to give up for now. Pure functions over the configuration, so the schedule
//! is unit-tested here and the pusher only applies it.

use std::time::Duration;

use crate::config::RetryConfig;

/// What an HTTP answer, or the lack of one, means for the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: the plugin has it.
    Delivered,
    /// Worth trying again later: 5xx, 408, 429, no answer at all, and anything the
    /// worker cannot interpret (a redirect, 1xx), since that points at its own setup,
    /// not at the event.
    Transient { retry_after: Option<Duration> },
    /// Another 4xx: the plugin refused this event; trying again would not change that.
    Refused,
}

/// Classifies a status. `retry_after` is the raw `Retry-After` header, honoured on 429
/// and 503 only (RFC 9110 §10.2.3), as seconds or as an HTTP date.
pub fn classify(status: u16, retry_after: Option<&str>, now_unix: u64) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        408 | 429 => Verdict::Transient {
            retry_after: retry_after_for(status, retry_after, now_unix),
        },
        400..=499 => Verdict::Refused,
        _ => Verdict::Transient {
            retry_after: retry_after_for(status, retry_after, now_unix),
        },
    }
}

/// The wait a `Retry-After` header asks for: delay-seconds, or an HTTP date in any of
/// the three forms a recipient must accept (IMF-fixdate, RFC 850, asctime; RFC 9110
/// §5.6.7), read by the `httpdate` crate. A date in the past means now.
fn retry_after_for(status: u16, header: Option<&str>, now_unix: u64) -> Option<Duration> {
    if status != 429 && status != 503 {
        return None;
    }
    let header = header?.trim();
    if let Ok(secs) = header.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(header)
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Duration::from_secs(at.saturating_sub(now_unix)))
}

impl RetryConfig {
    /// The wait before attempt `n + 1`, after `n` failed attempts (n ≥ 1):
    /// BACKOFF × FACTOR^(n-1), as the Python worker did, capped at `max_backoff`.
    pub fn delay_after(&self, failed_attempts: u32) -> Duration {
        let exponent = failed_attempts.saturating_sub(1).min(1000) as i32;
        let secs = self.backoff.as_secs_f64() * self.factor.powi(exponent);
        let cap = self.max_backoff.as_secs_f64();
        Duration::from_secs_f64(if secs.is_finite() { secs.min(cap) } else { cap })
    }

    /// The wait when the plugin asked for one: its `Retry-After`, within the cap, so a
    /// plugin saying "come back tomorrow" does not stall the worker for a day.
    pub fn delay_for(&self, failed_attempts: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(asked) => asked.min(self.max_backoff),
            None => self.delay_after(failed_attempts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryConfig {
        RetryConfig {
            max_attempts: 5,
            backoff: Duration::from_secs(1),
            factor: 2.0,
            max_backoff: Duration::from_secs(300),
        }
    }

    #[test]
    fn schedule_is_the_python_workers() {
        let delays: Vec<f64> = (1..=5)
            .map(|n| policy().delay_after(n).as_secs_f64())
            .collect();
        assert_eq!(delays, [1.0, 2.0, 4.0, 8.0, 16.0]);
    }

    #[test]
    fn schedule_is_capped() {
        assert_eq!(policy().delay_after(20), Duration::from_secs(300));
        assert_eq!(policy().delay_after(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(classify(200, None, 0), Verdict::Delivered);
        assert_eq!(classify(204, None, 0), Verdict::Delivered);
        for transient in [500, 502, 503, 504, 408, 429, 301, 302, 100] {
            assert!(
                matches!(classify(transient, None, 0), Verdict::Transient { .. }),
                "{transient}"
            );
        }
        for refused in [400, 401, 403, 404, 409, 413, 422] {
            assert_eq!(classify(refused, None, 0), Verdict::Refused, "{refused}");
        }
    }

    #[test]
    fn retry_after_is_read_on_429_and_503_only() {
        let after = |status, h| match classify(status, Some(h), 1_000_000) {
            Verdict::Transient { retry_after } => retry_after,
            v => panic!("{v:?}"),
        };
        assert_eq!(after(429, "7"), Some(Duration::from_secs(7)));
        assert_eq!(after(503, " 2 "), Some(Duration::from_secs(2)));
        assert_eq!(after(500, "7"), None);
        assert_eq!(after(503, "soon"), None);
        // 1_000_010 is 1970-01-12T13:46:50Z.
        assert_eq!(
            after(503, "Mon, 12 Jan 1970 13:46:50 GMT"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            after(503, "Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_takes_the_three_http_date_forms() {
        // RFC 9110 §5.6.7: a recipient accepts IMF-fixdate, RFC 850 and asctime.
        let at = 784_111_777 - 10; // 10 s before Sun, 06 Nov 1994 08:49:37 GMT
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                retry_after_for(503, Some(date), at),
                Some(Duration::from_secs(10)),
                "{date}"
            );
            assert_eq!(
                retry_after_for(429, Some(date), at + 60),
                Some(Duration::ZERO)
            );
        }
        for bad in ["Sun, 06 Nov 1994 08:49:37 PST", "tomorrow", "-1", "", "1.5"] {
            assert_eq!(retry_after_for(503, Some(bad), at), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_is_capped() {
        let p = policy();
        assert_eq!(
            p.delay_for(1, Some(Duration::from_secs(86_400))),
            Duration::from_secs(300)
        );
        assert_eq!(
            p.delay_for(3, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(p.delay_for(3, None), Duration::from_secs(4));
    }
}
