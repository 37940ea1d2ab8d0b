//! The lease that makes one instance per (stream, group) the active one (issue 9): a
//! Redis key `<stream>:<group>:active` whose value names the holder (consumer name, a
//! random token, since when), set with NX and a TTL, renewed by a compare-and-set script
//! a third of the TTL apart, and released on a clean stop. The others are standbys.
//! As in client-go's leader election and the Redis documentation's single-instance lock:
//! a holder steps down as soon as a renewal is late (two thirds of the TTL without one),
//! before the key can expire, and a new holder waits out whatever the previous one
//! could still have in flight ([`fence`]). The acker owns the lease and every decision
//! about it; this module only speaks to Redis and does the arithmetic.
//!
//! The value is JSON: `{"consumer":…,"token":…,"since":<unix ms>}`; a clean stop leaves
//! `{"free":true,"consumer":…}` for one TTL, so a standby knows nothing of the previous
//! holder is in flight and takes over at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::RedisError;
use serde::Deserialize;

use crate::store::{Names, Redis};

/// Takes the lease if it is free, expired, released, or held under this very consumer
/// name (this worker's previous self, restarted by systemd: it is gone). Returns how
/// it was taken, or who holds it and for how long still.
const ACQUIRE: &str = r#"
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {'absent', ''}
end
local ok, held = pcall(cjson.decode, current)
if ok and type(held) == 'table' and (held['free'] or held['consumer'] == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if held['free'] then return {'released', current} end
  return {'own', current}
end
return {'held', current, tostring(redis.call('PTTL', KEYS[1]))}
"#;

/// Extends the lease when it is still ours.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Marks the lease free when it is still ours.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"#;

/// How the lease was found when this instance tried to take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Nobody held it: never taken, or the holder's TTL ran out. If other consumers
    /// hold pending entries, a request of theirs may still be in flight: [`fence`].
    Absent,
    /// Released by a clean stop, or held under our own consumer name: nothing of the
    /// previous holder can be in flight.
    Clean { previous: Holder },
    /// Someone else holds it: stay a standby.
    Held { holder: Holder, ttl_left: Duration },
}

/// What the lease's value says.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct Holder {
    #[serde(default)]
    pub consumer: String,
    #[serde(default)]
    pub token: String,
    /// Unix milliseconds when it took the lease.
    #[serde(default)]
    pub since: u64,
    #[serde(default)]
    pub free: bool,
}

impl Holder {
    fn parse(value: &str) -> Holder {
        serde_json::from_str(value).unwrap_or_else(|_| Holder {
            consumer: value.to_string(),
            ..Holder::default()
        })
    }
}

/// This instance's claim on the lease.
#[derive(Debug, Clone)]
pub struct Lease {
    key: String,
    consumer: String,
    value: String,
    pub ttl: Duration,
}

/// The lease key of a stream and group.
pub fn key(names: &Names) -> String {
    format!("{}:{}:active", names.stream, names.group)
}

impl Lease {
    pub fn new(names: &Names, ttl: Duration) -> Lease {
        let value = serde_json::json!({
            "consumer": names.consumer,
            "token": token(),
            "since": unix_ms(),
        })
        .to_string();
        Lease {
            key: key(names),
            consumer: names.consumer.clone(),
            value,
            ttl,
        }
    }

    /// A renewal is tried this often.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// The holder stops starting requests when no renewal succeeded for this long: the
    /// key still has a third of its TTL to live, so nobody else can hold it yet.
    pub fn deadline(&self) -> Duration {
        self.ttl * 2 / 3
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn value(&self) -> &str {
        &self.value
    }

    pub fn try_take(&self, redis: &mut Redis) -> Result<Taken, RedisError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(ACQUIRE)
            .arg(1)
            .arg(&self.key)
            .arg(&self.value)
            .arg(self.ttl.as_millis() as u64)
            .arg(&self.consumer);
        let reply: Vec<String> = redis.query(&cmd)?;
        let previous = || Holder::parse(reply.get(1).map_or("", String::as_str));
        Ok(match reply.first().map(String::as_str) {
            Some("absent") => Taken::Absent,
            Some("released" | "own") => Taken::Clean {
                previous: previous(),
            },
            _ => Taken::Held {
                holder: previous(),
                ttl_left: Duration::from_millis(
                    reply.get(2).and_then(|t| t.parse().ok()).unwrap_or(0),
                ),
            },
        })
    }

    /// True when the lease was still ours and is extended by one TTL.
    pub fn renew(&self, redis: &mut Redis) -> Result<bool, RedisError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RENEW)
            .arg(1)
            .arg(&self.key)
            .arg(&self.value)
            .arg(self.ttl.as_millis() as u64);
        Ok(redis.query::<i64>(&cmd)? == 1)
    }

    /// Leaves the lease marked free for one TTL, when it is still ours.
    pub fn release(&self, redis: &mut Redis) -> Result<bool, RedisError> {
        let free = serde_json::json!({"free": true, "consumer": self.consumer}).to_string();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RELEASE)
            .arg(1)
            .arg(&self.key)
            .arg(&self.value)
            .arg(free)
            .arg(self.ttl.as_millis() as u64);
        Ok(redis.query::<i64>(&cmd)? == 1)
    }
}

/// How long a new holder that found the lease absent waits before its first request,
/// when other consumers hold pending entries: the previous holder's key expired at
/// the latest when we took it, so its last renewal was at least one TTL earlier; it
/// stopped starting requests a renewal deadline after that renewal, and a request it
/// started then ends within the request timeout. Zero when that is already past.
pub fn fence(ttl: Duration, deadline: Duration, request_timeout: Duration) -> Duration {
    (deadline + request_timeout).saturating_sub(ttl)
}

/// Who holds the lease of `names` and for how long still, for `paheko-push check`.
pub fn describe(
    redis: &mut Redis,
    names: &Names,
) -> Result<Option<(Holder, Duration)>, RedisError> {
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(key(names)).cmd("PTTL").arg(key(names));
    let (value, ttl): (Option<String>, i64) = redis.query_pipeline(&pipe)?;
    Ok(value.map(|v| (Holder::parse(&v), Duration::from_millis(ttl.max(0) as u64))))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// 128 random bits, hex: tells two processes under one consumer name apart.
fn token() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    // The system's generator does not fail on Linux; a zero token would still work.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_fence_a_takeover_by_the_request_timeout() {
        let ttl = Duration::from_secs(15);
        let deadline = ttl * 2 / 3;
        // Lease 15 s, timeout 30 s: 10 + 30 - 15 = 25 s after taking an expired lease.
        assert_eq!(
            fence(ttl, deadline, Duration::from_secs(30)),
            Duration::from_secs(25)
        );
        // A short request timeout: nothing left to wait.
        assert_eq!(fence(ttl, deadline, Duration::from_secs(2)), Duration::ZERO);
    }

    #[test]
    fn a_holder_is_read_from_json_or_taken_as_a_name() {
        let h = Holder::parse(r#"{"consumer":"box-1","token":"ab","since":17}"#);
        assert_eq!((h.consumer.as_str(), h.since, h.free), ("box-1", 17, false));
        assert!(Holder::parse(r#"{"free":true,"consumer":"box-1"}"#).free);
        assert_eq!(Holder::parse("legacy").consumer, "legacy");
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(token(), token());
        assert_eq!(token().len(), 32);
    }
}
