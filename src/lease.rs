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

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::sync::LazyLock;

use redis::{RedisError, Script, Value};
use serde::Deserialize;

use crate::event::StreamId;
use crate::store::{Names, Redis};

/// How often a standby tries to take the lease (client-go's RetryPeriod), at most.
pub const RETRY: Duration = Duration::from_secs(2);

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

/// Acknowledges entries only while the lease is ours: a holder that lost it leaves
/// them pending for the new one (which may be sending them already).
const ACK: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
return redis.call('XACK', KEYS[2], ARGV[2], unpack(ARGV, 3))
"#;

/// A new holder makes every pending entry of the group its own, in one step, so no
/// moment shows two consumers holding entries: XCLAIM … JUSTID (which does not count
/// as a delivery), 1,000 at a time in ID order. Entries gone from the stream (trimmed
/// while pending) are not claimed but returned, to be reported and acknowledged.
const TAKE_OVER: &str = r#"
local moved, gone, start = 0, {}, '-'
while true do
  local rows = redis.call('XPENDING', KEYS[1], ARGV[1], start, '+', 1000)
  if #rows == 0 then break end
  local ids = {}
  for _, row in ipairs(rows) do
    if row[2] ~= ARGV[2] then
      if #redis.call('XRANGE', KEYS[1], row[1], row[1]) == 0 then
        table.insert(gone, row[1])
      else
        table.insert(ids, row[1])
      end
    end
  end
  if #ids > 0 then
    local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
    for _, id in ipairs(ids) do table.insert(claim, id) end
    table.insert(claim, 'JUSTID')
    redis.call(unpack(claim))
    moved = moved + #ids
  end
  if #rows < 1000 then break end
  start = '(' .. rows[#rows][1]
end
return {moved, gone}
"#;

/// Consumers other than this one with nothing pending, idle for longer than ARGV[2]
/// milliseconds, are deleted.
const FORGET_IDLE: &str = r#"
local deleted = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['name'] ~= ARGV[3] and info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(deleted, info['name'])
  end
end
return deleted
"#;

/// Loaded once per connection and then called by its SHA (EVALSHA): it runs for every
/// batch of acknowledgements.
static ACK_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ACK));

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

/// What the acker tells the reader: read (taking every pending entry of the group
/// first), or read nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Active,
    Standby,
}

/// A change of this instance's standing, for the acker to act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// This instance holds the lease; it may send once `fence` has passed.
    Took { how: Taken, fence: Duration },
    /// It lost the lease or could not renew it in time: it stops sending at once.
    SteppedDown { why: String },
}

/// Where this instance stands, as plain data the acker keeps with its timers.
#[derive(Debug)]
pub struct Standing {
    lease: Lease,
    request_timeout: Duration,
    state: State,
    /// The holder last logged while standing by, so it is said once.
    seen_holder: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Standby {
        next_try: Instant,
    },
    Active {
        renewed: Instant,
        next_renew: Instant,
        fence_until: Instant,
    },
}

impl Standing {
    pub fn new(lease: Lease, request_timeout: Duration) -> Standing {
        Standing {
            lease,
            request_timeout,
            state: State::Standby {
                next_try: Instant::now(),
            },
            seen_holder: None,
        }
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active { .. })
    }

    /// Whether requests may start now: active, past the fence, and renewed recently
    /// enough that nobody else can hold the lease.
    pub fn may_send(&self, now: Instant) -> bool {
        match self.state {
            State::Active {
                renewed,
                fence_until,
                ..
            } => now >= fence_until && now < renewed + self.lease.deadline(),
            State::Standby { .. } => false,
        }
    }

    /// The next moment [`Standing::step`] has something to do.
    pub fn next_timer(&self, now: Instant) -> Instant {
        match self.state {
            State::Standby { next_try } => next_try,
            State::Active {
                renewed,
                next_renew,
                fence_until,
            } => {
                let deadline = renewed + self.lease.deadline();
                let fence = Some(fence_until).filter(|t| *t > now);
                [Some(next_renew), Some(deadline), fence]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(next_renew)
            }
        }
    }

    /// Takes, renews or gives up the lease as its timers say.
    pub fn step(&mut self, redis: &mut Redis, names: &Names, now: Instant) -> Option<Change> {
        match self.state {
            State::Standby { next_try } if now >= next_try => self.try_take(redis, names, now),
            State::Active { renewed, .. } if now >= renewed + self.lease.deadline() => {
                let why = format!(
                    "no renewal of the lease for {} s",
                    now.duration_since(renewed).as_secs()
                );
                Some(self.step_down(now, why))
            }
            State::Active {
                renewed,
                next_renew,
                fence_until,
            } if now >= next_renew => match self.lease.renew(redis) {
                Ok(true) => {
                    self.state = State::Active {
                        renewed: now,
                        next_renew: now + self.lease.renew_every(),
                        fence_until,
                    };
                    None
                }
                Ok(false) => {
                    Some(self.step_down(now, "the lease is held by another instance".into()))
                }
                Err(e) => {
                    log::warn!(error = e.to_string().as_str();
                        "could not renew the lease; trying again");
                    self.state = State::Active {
                        renewed,
                        next_renew: now + Duration::from_secs(1),
                        fence_until,
                    };
                    None
                }
            },
            _ => None,
        }
    }

    fn try_take(&mut self, redis: &mut Redis, names: &Names, now: Instant) -> Option<Change> {
        let retry = RETRY.min(self.lease.renew_every());
        let taken = match self.lease.try_take(redis) {
            Ok(taken) => taken,
            Err(e) => {
                log::warn!(error = e.to_string().as_str(); "could not ask Redis for the lease");
                self.state = State::Standby {
                    next_try: now + retry,
                };
                return None;
            }
        };
        let fence = match &taken {
            Taken::Held { holder, ttl_left } => {
                if self.seen_holder.as_deref() != Some(holder.consumer.as_str()) {
                    log::info!(holder = holder.consumer.as_str(), ttl_left_ms = ttl_left.as_millis() as u64;
                        "standing by: another instance holds the lease and delivers");
                    self.seen_holder = Some(holder.consumer.clone());
                }
                self.state = State::Standby {
                    next_try: now + retry.min(*ttl_left + Duration::from_millis(20)),
                };
                return None;
            }
            Taken::Clean { .. } => Duration::ZERO,
            // Nobody held it: wait out a previous holder's requests, if it left any
            // entry pending (an entry in flight is always pending).
            Taken::Absent => match others_pending(redis, names) {
                Ok(false) => Duration::ZERO,
                Ok(true) | Err(_) => {
                    fence(self.lease.ttl, self.lease.deadline(), self.request_timeout)
                }
            },
        };
        self.seen_holder = None;
        self.state = State::Active {
            renewed: now,
            next_renew: now + self.lease.renew_every(),
            fence_until: now + fence,
        };
        Some(Change::Took { how: taken, fence })
    }

    fn step_down(&mut self, now: Instant, why: String) -> Change {
        self.state = State::Standby {
            next_try: now + RETRY.min(self.lease.renew_every()),
        };
        Change::SteppedDown { why }
    }

    /// XACK of `ids`, only while the lease is ours. False when it is not: the entries
    /// stay pending for the new holder.
    pub fn ack(
        &self,
        redis: &mut Redis,
        names: &Names,
        ids: &[StreamId],
    ) -> Result<bool, RedisError> {
        if ids.is_empty() {
            return Ok(true);
        }
        let mut call = ACK_SCRIPT.prepare_invoke();
        call.key(self.lease.key())
            .key(&names.stream)
            .arg(self.lease.value())
            .arg(&names.group);
        for id in ids {
            call.arg(id.to_string());
        }
        Ok(redis.invoke::<i64>(&call)? >= 0)
    }

    /// On a clean stop, once nothing is in flight: the lease is marked free, so a
    /// standby takes over at once.
    pub fn release(&mut self, redis: &mut Redis) {
        if !self.is_active() {
            return;
        }
        match self.lease.release(redis) {
            Ok(true) => log::info!("lease released: a standby takes over at once"),
            Ok(false) => {}
            Err(e) => log::warn!(error = e.to_string().as_str();
                "could not release the lease: a standby takes over once it expires"),
        }
        self.state = State::Standby {
            next_try: Instant::now() + RETRY,
        };
    }
}

/// Makes every pending entry of the group this consumer's (see [`TAKE_OVER`]): returns
/// how many were moved, and the IDs of those gone from the stream.
pub fn take_over(redis: &mut Redis, names: &Names) -> Result<(u64, Vec<StreamId>), RedisError> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(TAKE_OVER)
        .arg(1)
        .arg(&names.stream)
        .arg(&names.group)
        .arg(&names.consumer);
    let (moved, gone): (u64, Vec<String>) = redis.query(&cmd)?;
    Ok((
        moved,
        gone.iter().filter_map(|id| id.parse().ok()).collect(),
    ))
}

/// Deletes the group's consumers (other than this one) that hold nothing and were
/// idle longer than `idle`: renamed containers do not pile up. Returns their names.
pub fn forget_idle_consumers(
    redis: &mut Redis,
    names: &Names,
    idle: Duration,
) -> Result<Vec<String>, RedisError> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(FORGET_IDLE)
        .arg(1)
        .arg(&names.stream)
        .arg(&names.group)
        .arg(idle.as_millis() as u64)
        .arg(&names.consumer);
    redis.query(&cmd)
}

/// Whether consumers other than this one hold pending entries in the group.
fn others_pending(redis: &mut Redis, names: &Names) -> Result<bool, RedisError> {
    let mut cmd = redis::cmd("XPENDING");
    cmd.arg(&names.stream).arg(&names.group);
    let summary: Value = match redis.query(&cmd) {
        Ok(v) => v,
        Err(e) if crate::store::is_no_group(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    let Value::Array(parts) = summary else {
        return Ok(false);
    };
    let Some(Value::Array(consumers)) = parts.get(3) else {
        return Ok(false);
    };
    Ok(consumers.iter().any(|c| match c {
        Value::Array(pair) => match pair.first() {
            Some(Value::BulkString(name)) => name.as_slice() != names.consumer.as_bytes(),
            _ => true,
        },
        _ => true,
    }))
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
