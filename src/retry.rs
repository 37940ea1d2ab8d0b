//! The retry policy: which answers are worth another try, how long to wait before it,
//! and when to give up on a ticket. Pure functions and plain data over the
//! configuration, so the schedule is unit-tested here; the acker applies it, with its
//! timers, and no thread ever sleeps through a backoff.

use std::time::{Duration, Instant};

use crate::config::RetryConfig;

/// What an HTTP answer, or the lack of one, means for the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: the plugin has it.
    Delivered,
    /// Worth trying again later: 5xx, 408, 429, no answer at all, and anything the
    /// worker cannot interpret (1xx), since that points at its own setup, not at the
    /// event.
    Transient { retry_after: Option<Duration> },
    /// A per-ticket 4xx (`PAHEKO_PUSH_DEAD_LETTER_STATUSES`): the plugin refused this
    /// ticket's content; trying again would not change that.
    Rejected,
    /// Any other 4xx (401, 403, 404, 405…) and any 3xx: the plugin refuses every ticket
    /// (a secret rotated on one side, a wrong URL). The ticket stays pending; nothing is
    /// dead-lettered for it.
    Refusing,
}

/// The per-ticket statuses by default: the ticket's content is at fault.
pub const DEAD_LETTER_STATUSES: [u16; 5] = [400, 409, 413, 415, 422];

/// Classifies a status. `retry_after` is the raw `Retry-After` header, honoured on 429
/// and 503 only (RFC 9110 §10.2.3). `dead_letter` lists the per-ticket 4xx statuses.
pub fn classify(
    status: u16,
    retry_after: Option<&str>,
    now_unix: u64,
    dead_letter: &[u16],
) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        // Redirects are not followed (a POST must not wander off with the secret): the
        // URL is wrong for every ticket (issue 16 §1).
        300..=399 => Verdict::Refusing,
        408 | 429 => Verdict::Transient {
            retry_after: retry_after_for(status, retry_after, now_unix),
        },
        s if dead_letter.contains(&s) => Verdict::Rejected,
        400..=499 => Verdict::Refusing,
        _ => Verdict::Transient {
            retry_after: retry_after_for(status, retry_after, now_unix),
        },
    }
}

/// What a plugin-wide refusal most likely means, for the operator reading the log.
pub fn refusal_meaning(status: u16) -> &'static str {
    match status {
        401 | 403 => {
            "the plugin does not accept the secret or the signature: PAHEKO_PLUGIN_SECRET \
             (or PAHEKO_PUSH_AUTH) does not match the plugin's"
        }
        404 => {
            "nothing at that address: PAHEKO_PLUGIN_URL is wrong, or the plugin is not installed"
        }
        405 => "the address does not take POST: PAHEKO_PLUGIN_URL points at the wrong page",
        300..=399 => {
            "the plugin's address redirects elsewhere (redirects are not followed): set \
             PAHEKO_PLUGIN_URL to the address the redirect names, e.g. with the trailing \
             slash of /p/NAME/"
        }
        _ => "the plugin refuses every ticket: check its logs and the worker's configuration",
    }
}

/// The wait a `Retry-After` header asks for: delay-seconds, or an HTTP date in any of
/// the three forms a recipient must accept (IMF-fixdate, RFC 850, asctime; RFC 9110
/// §5.6.7), read by the `httpdate` crate. A date in the past means now.
pub fn retry_after_for(status: u16, header: Option<&str>, now_unix: u64) -> Option<Duration> {
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

    /// The wait before the next attempt: the plugin's `Retry-After` when it gave one
    /// (kept as asked, within the cap, so "come back tomorrow" does not stall a lane for
    /// a day), else our own backoff spread by [`jitter`].
    /// Never shorter than [`MIN_DELAY`].
    pub fn delay_for(
        &self,
        failed_attempts: u32,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Duration {
        let delay = match retry_after {
            Some(asked) => asked.min(self.max_backoff),
            None => jitter(self.delay_after(failed_attempts), unit),
        };
        delay.max(MIN_DELAY)
    }
}

/// `d` spread by ±10 % (`unit` is in -1..=1, from [`Rng::unit`]), so that events (and
/// the probes of several instances) do not fall into step.
pub fn jitter(d: Duration, unit: f64) -> Duration {
    d.mul_f64(1.0 + 0.1 * unit.clamp(-1.0, 1.0))
}

/// The shortest wait before another attempt of a ticket, whatever `Retry-After` or
/// PAHEKO_PUSH_BACKOFF_SECONDS say: `Retry-After: 0` retried one ticket 20,461 times in
/// 5 s (issue 13, 4).
pub const MIN_DELAY: Duration = Duration::from_millis(100);

/// A small seeded generator (splitmix64) for the jitter: the coordinator reads no
/// clock and no system randomness, so a simulation seed replays exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The system's randomness, for a real run.
    pub fn from_entropy() -> Rng {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(Instant::now().elapsed().as_nanos());
        Rng(h.finish())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in -1..=1.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() % 2001) as f64 / 1000.0 - 1.0
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// When a ticket is given up on (§3 of issue 8): a *round* is MAX_RETRIES transient
/// failures in a row; it counts when the plugin accepted other tickets since the
/// ticket's previous round ended, i.e. the ticket is failing alone. After
/// `give_up_after` counted rounds (0 = never) the ticket is dead-lettered as
/// `failing_alone`, so its session can go on. A plugin down for everyone accepts
/// nothing, so no round counts and nothing is ever given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiveUp {
    pub round: u32,
    pub after_rounds: u32,
}

/// What the acker remembers of a ticket that failed at least once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tries {
    /// Transient failures so far.
    pub failed: u32,
    /// Rounds that ended while other tickets were accepted.
    pub alone_rounds: u32,
    /// The plugin's acceptances (all tickets) when the current round began.
    pub accepted_at_round_start: u64,
    /// The plugin's acceptances when it last refused this ticket with a status that
    /// may be plugin-wide (3xx, unlisted 4xx); see [`crate::core`].
    pub refused_at: Option<u64>,
}

/// The acker's next step for a ticket after a transient failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Try again after this long. `parked`: a round just ended (logged louder).
    Retry { after: Duration, parked: bool },
    /// Failing alone for `give_up.after_rounds` rounds: dead-letter it.
    GiveUp,
}

impl Tries {
    pub fn new(accepted: u64) -> Tries {
        Tries {
            failed: 0,
            alone_rounds: 0,
            accepted_at_round_start: accepted,
            refused_at: None,
        }
    }

    /// Records a transient failure. `accepted` is the plugin's running count of
    /// accepted tickets (all of them).
    pub fn failed(
        &mut self,
        policy: &RetryConfig,
        give_up_after: u32,
        accepted: u64,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Next {
        self.failed = self.failed.saturating_add(1);
        let round_ended = self.failed.is_multiple_of(policy.max_attempts);
        // Each round runs the same capped schedule: a parked ticket is tried again
        // after the round's last wait (16 s by default), then from the first one again.
        // Doubling on past the round made an unlucky ticket of a flaky plugin wait
        // minutes (a 6,000-ticket drain at 20 % 503s took 84 s); the breaker, not this
        // schedule, spares a plugin that is down.
        let in_round = (self.failed - 1) % policy.max_attempts + 1;
        if round_ended {
            if accepted > self.accepted_at_round_start {
                self.alone_rounds += 1;
            }
            self.accepted_at_round_start = accepted;
            if give_up_after > 0 && self.alone_rounds >= give_up_after {
                return Next::GiveUp;
            }
        }
        Next::Retry {
            after: policy.delay_for(in_round, retry_after, unit),
            parked: round_ended,
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
        assert_eq!(
            classify(200, None, 0, &DEAD_LETTER_STATUSES),
            Verdict::Delivered
        );
        assert_eq!(
            classify(204, None, 0, &DEAD_LETTER_STATUSES),
            Verdict::Delivered
        );
        for transient in [500, 502, 503, 504, 408, 429, 100] {
            assert!(
                matches!(
                    classify(transient, None, 0, &DEAD_LETTER_STATUSES),
                    Verdict::Transient { .. }
                ),
                "{transient}"
            );
        }
        for rejected in DEAD_LETTER_STATUSES {
            assert_eq!(
                classify(rejected, None, 0, &DEAD_LETTER_STATUSES),
                Verdict::Rejected,
                "{rejected}"
            );
        }
        for refusing in [401, 403, 404, 405, 410, 451, 300, 301, 302, 307, 308, 399] {
            assert_eq!(
                classify(refusing, None, 0, &DEAD_LETTER_STATUSES),
                Verdict::Refusing,
                "{refusing}"
            );
        }
        // The list is the operator's: 403 may be made per-ticket, 422 plugin-wide.
        assert_eq!(classify(403, None, 0, &[403]), Verdict::Rejected);
        assert_eq!(classify(422, None, 0, &[403]), Verdict::Refusing);
        assert!(refusal_meaning(302).contains("PAHEKO_PLUGIN_URL"));
    }

    #[test]
    fn retry_after_is_read_on_429_and_503_only() {
        let after = |status, h| match classify(status, Some(h), 1_000_000, &DEAD_LETTER_STATUSES) {
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
            p.delay_for(1, Some(Duration::from_secs(86_400)), 0.0),
            Duration::from_secs(300)
        );
        assert_eq!(
            p.delay_for(3, Some(Duration::from_secs(2)), 0.0),
            Duration::from_secs(2)
        );
        let jittered = p.delay_for(3, None, Rng::new(7).unit()).as_secs_f64();
        assert!((3.6..=4.4).contains(&jittered), "{jittered}");
    }

    #[test]
    fn a_zero_wait_is_floored() {
        let mut p = policy();
        assert_eq!(p.delay_for(1, Some(Duration::ZERO), 0.0), MIN_DELAY);
        p.backoff = Duration::ZERO;
        assert_eq!(p.delay_for(4, None, 1.0), MIN_DELAY);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let mut rng = Rng::new(1);
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(10), rng.unit()).as_secs_f64();
            assert!((9.0..=11.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn jitter_spreads_by_exactly_ten_percent_at_the_ends() {
        let d = Duration::from_secs(10);
        assert_eq!(jitter(d, 0.0), d);
        assert_eq!(jitter(d, 1.0), Duration::from_secs(11));
        assert_eq!(jitter(d, -1.0), Duration::from_secs(9));
        assert_eq!(jitter(d, 7.0), Duration::from_secs(11), "clamped");
        assert_eq!(jitter(d, -7.0), Duration::from_secs(9), "clamped");
    }

    #[test]
    fn the_generator_is_splitmix64() {
        // The reference outputs for seed 0 (Vigna's splitmix64.c): a seed replays the
        // same simulation on every machine and after every refactoring.
        let mut rng = Rng::new(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(rng.next_u64(), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn units_and_draws_cover_their_ranges() {
        let mut rng = Rng::new(7);
        let units: Vec<f64> = (0..2000).map(|_| rng.unit()).collect();
        assert!(units.iter().all(|u| (-1.0..=1.0).contains(u)));
        let (min, max) = units
            .iter()
            .fold((1.0f64, -1.0f64), |(lo, hi), u| (lo.min(*u), hi.max(*u)));
        assert!(min < -0.99 && max > 0.99, "{min} {max}");
        let mean = units.iter().sum::<f64>() / units.len() as f64;
        assert!(mean.abs() < 0.1, "{mean}");
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[rng.below(3) as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
        assert_eq!(rng.below(0), 0, "n = 0 is taken as 1");
    }

    /// Fails `rounds` full rounds; `others` tickets are accepted during each.
    fn fail_rounds(t: &mut Tries, give_up: u32, rounds: u32, others: u64) -> Vec<Next> {
        let p = policy();
        let mut rng = Rng::new(u64::from(rounds));
        let mut accepted = t.accepted_at_round_start;
        let mut out = Vec::new();
        for _ in 0..rounds * p.max_attempts {
            accepted += others;
            out.push(t.failed(&p, give_up, accepted, None, rng.unit()));
        }
        out
    }

    #[test]
    fn a_parked_event_keeps_the_capped_backoff() {
        let mut t = Tries::new(0);
        let nexts = fail_rounds(&mut t, 0, 4, 0);
        let after: Vec<f64> = nexts
            .iter()
            .map(|n| match n {
                Next::Retry { after, .. } => after.as_secs_f64(),
                Next::GiveUp => panic!("never gives up with 0"),
            })
            .collect();
        // Attempt 5 ended the first round: the 6th waits 16 s (±10 %), not CLAIM_IDLE;
        // then the schedule starts over, round after round.
        assert!((14.4..=17.6).contains(&after[4]), "{after:?}");
        assert!((0.9..=1.1).contains(&after[5]), "{after:?}");
        assert!((14.4..=17.6).contains(&after[19]), "{after:?}");
        assert!(after.iter().all(|a| *a <= 17.6), "{after:?}");
        let parked: Vec<usize> = nexts
            .iter()
            .enumerate()
            .filter(|(_, n)| matches!(n, Next::Retry { parked: true, .. }))
            .map(|(i, _)| i + 1)
            .collect();
        assert_eq!(parked, [5, 10, 15, 20]);
    }

    #[test]
    fn a_ticket_failing_alone_is_given_up_after_the_counted_rounds() {
        let mut t = Tries::new(100);
        let nexts = fail_rounds(&mut t, 3, 3, 1);
        assert_eq!(nexts.iter().filter(|n| **n == Next::GiveUp).count(), 1);
        assert_eq!(nexts.last(), Some(&Next::GiveUp));
        assert_eq!(t.alone_rounds, 3);
    }

    #[test]
    fn an_outage_for_everyone_never_gives_up() {
        let mut t = Tries::new(100);
        let nexts = fail_rounds(&mut t, 1, 50, 0);
        assert!(nexts.iter().all(|n| *n != Next::GiveUp));
        assert_eq!(t.alone_rounds, 0);
    }

    #[test]
    fn only_rounds_with_other_acceptances_count() {
        let mut t = Tries::new(0);
        // Round 1: others accepted. Round 2: an outage. Round 3: others again.
        assert!(
            fail_rounds(&mut t, 2, 1, 1)
                .iter()
                .all(|n| *n != Next::GiveUp)
        );
        assert!(
            fail_rounds(&mut t, 2, 1, 0)
                .iter()
                .all(|n| *n != Next::GiveUp)
        );
        assert_eq!(t.alone_rounds, 1);
        assert_eq!(fail_rounds(&mut t, 2, 1, 1).last(), Some(&Next::GiveUp));
    }

    /// The log names what to fix for each plugin-wide refusal (killed `cargo mutants`
    /// survivors: each arm removed, or the text replaced, went unnoticed).
    #[test]
    fn each_refusal_names_what_to_fix() {
        for (status, names) in [
            (401, "PAHEKO_PLUGIN_SECRET"),
            (403, "PAHEKO_PLUGIN_SECRET"),
            (404, "PAHEKO_PLUGIN_URL is wrong"),
            (405, "does not take POST"),
            (400, "refuses every ticket"),
            (418, "refuses every ticket"),
        ] {
            assert!(
                refusal_meaning(status).contains(names),
                "{status}: {}",
                refusal_meaning(status)
            );
        }
    }
}
