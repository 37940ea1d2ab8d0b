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

use redis::{RedisError, Script};
use serde::Deserialize;

use crate::core::LeaseReply;
use crate::event::StreamId;
use crate::store::{Names, Redis};

/// Takes the lease if it is free, expired, released, has no expiry (a value restored
/// from a dump, or set by hand: no holder ever writes one), or is this very process's
/// (same token: a re-take after stepping down). Each take starts a new tenure: a number
/// from the counter KEYS[2] that only grows, written into the value as a fencing token.
/// Under this consumer name with another token, it answers `same_name`: the caller
/// tells a restarted self (a process of this host that no longer runs) from a live twin
/// (issue 13, 3). Returns {how, previous value, tenure or PTTL, new value}.
const ACQUIRE: &str = r#"
local current = redis.call('GET', KEYS[1])
local function take(how)
  local tenure = redis.call('INCR', KEYS[2])
  local value = cjson.encode({consumer = ARGV[1], token = ARGV[2], tenure = tenure,
    since = tonumber(ARGV[4]), host = ARGV[5], pid = tonumber(ARGV[6])})
  redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
  return {how, current or '', tostring(tenure), value}
end
if not current then return take('absent') end
if redis.call('PTTL', KEYS[1]) == -1 then return take('repaired') end
local ok, held = pcall(cjson.decode, current)
if ok and type(held) == 'table' then
  if held['free'] then return take('released') end
  if held['token'] == ARGV[2] then return take('own') end
  if held['consumer'] == ARGV[1] then
    return {'same_name', current, tostring(redis.call('PTTL', KEYS[1])), ''}
  end
end
return {'held', current, tostring(redis.call('PTTL', KEYS[1])), ''}
"#;

/// Takes the lease from a dead process that held it under our consumer name, only if
/// it still holds exactly ARGV[7] (compare-and-set).
const TAKE_FROM_DEAD: &str = r#"
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[7] then return {'changed', current or '', '0', ''} end
local tenure = redis.call('INCR', KEYS[2])
local value = cjson.encode({consumer = ARGV[1], token = ARGV[2], tenure = tenure,
  since = tonumber(ARGV[4]), host = ARGV[5], pid = tonumber(ARGV[6])})
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return {'restarted', current, tostring(tenure), value}
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
if redis.call('GET', KEYS[2]) ~= ARGV[3] then
  return redis.error_reply('NOTHOLDER the lease is no longer this instance\'s')
end
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

/// How this instance took the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Nobody held it: never taken, or the holder's TTL ran out. If other consumers
    /// hold pending entries, a request of theirs may still be in flight: the fence.
    Absent,
    /// It had no expiry (restored from a dump, set by hand): taken as if absent.
    Repaired,
    /// Released by a clean stop: nothing of the previous holder is in flight.
    Released { previous: Holder },
    /// This very process held it (a re-take after stepping down); its own requests of
    /// the earlier tenure are waited for by the coordinator.
    Own,
    /// Held under this consumer name by a process of this host that no longer runs.
    Restarted { previous: Holder },
}

impl Taken {
    /// For the log line, in words.
    pub fn describe(&self) -> &'static str {
        match self {
            Taken::Absent => "it was free",
            Taken::Repaired => "it had no expiry, repaired",
            Taken::Released { .. } => "released by the previous holder",
            Taken::Own => "taken back by this process",
            Taken::Restarted { .. } => "held by this consumer's previous process, which is gone",
        }
    }
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
    /// The tenure it holds; 0 for a value of an older version.
    #[serde(default)]
    pub tenure: u64,
    /// Which host (machine boot and hostname) and process hold it.
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub pid: u32,
}

impl Holder {
    pub fn parse(value: &str) -> Holder {
        serde_json::from_str(value).unwrap_or_else(|_| Holder {
            consumer: value.to_string(),
            ..Holder::default()
        })
    }
}

/// This instance's claim on the lease: who it is, and the Redis calls. The decisions
/// (when to take, renew, step down; the fence) are the coordinator's ([`crate::core`]).
#[derive(Debug, Clone)]
pub struct Lease {
    key: String,
    tenure_key: String,
    consumer: String,
    token: String,
    host: String,
    ttl: Duration,
}

/// The lease key of a stream and group.
pub fn key(names: &Names) -> String {
    format!("{}:{}:active", names.stream, names.group)
}

/// The counter the tenures are drawn from, beside the lease.
pub fn tenure_key(names: &Names) -> String {
    format!("{}:{}:tenure", names.stream, names.group)
}

impl Lease {
    pub fn new(names: &Names, ttl: Duration) -> Lease {
        Lease {
            key: key(names),
            tenure_key: tenure_key(names),
            consumer: names.consumer.clone(),
            token: token(),
            host: host_id(),
            ttl,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Takes the lease if it may ([`ACQUIRE`]), or says who holds it.
    pub fn take(&self, redis: &mut Redis, names: &Names) -> Result<LeaseReply, RedisError> {
        let sent_at = Instant::now();
        let reply = self.call(redis, ACQUIRE, None)?;
        self.reply(redis, names, reply, sent_at)
    }

    /// Takes it from our consumer name's dead process, if it still holds `value`.
    pub fn take_from_dead(
        &self,
        redis: &mut Redis,
        names: &Names,
        value: &str,
    ) -> Result<LeaseReply, RedisError> {
        let sent_at = Instant::now();
        let reply = self.call(redis, TAKE_FROM_DEAD, Some(value))?;
        self.reply(redis, names, reply, sent_at)
    }

    fn call(
        &self,
        redis: &mut Redis,
        script: &str,
        expected: Option<&str>,
    ) -> Result<Vec<String>, RedisError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script)
            .arg(2)
            .arg(&self.key)
            .arg(&self.tenure_key)
            .arg(&self.consumer)
            .arg(&self.token)
            .arg(self.ttl.as_millis() as u64)
            .arg(unix_ms())
            .arg(&self.host)
            .arg(std::process::id());
        if let Some(expected) = expected {
            cmd.arg(expected);
        }
        redis.query(&cmd)
    }

    fn reply(
        &self,
        redis: &mut Redis,
        names: &Names,
        reply: Vec<String>,
        sent_at: Instant,
    ) -> Result<LeaseReply, RedisError> {
        let field = |n: usize| reply.get(n).map_or("", String::as_str);
        let previous = Holder::parse(field(1));
        let number = field(2).parse::<i64>().unwrap_or(0);
        let took = |how, pending: bool| LeaseReply::Took {
            tenure: number.max(0) as u64,
            value: field(3).to_string(),
            how,
            others_pending: pending,
            sent_at,
        };
        // Asked only when a previous holder may have left requests in flight. Any pending
        // entry counts, ours too: a twin under our consumer name (or our own previous
        // process) may be the one still sending it.
        let mut pending = || crate::store::pending_count(redis, names).map_or(true, |n| n > 0);
        Ok(match field(0) {
            "absent" => took(Taken::Absent, pending()),
            "repaired" => {
                log::error!(key = self.key.as_str();
                    "the lease key had no expiry (restored from a dump, or set by hand?): taken as if it were free");
                took(Taken::Repaired, pending())
            }
            "released" => took(Taken::Released { previous }, false),
            "own" => took(Taken::Own, false),
            "restarted" => took(Taken::Restarted { previous }, pending()),
            "same_name" | "held" | "changed" => {
                let same_name_dead = (field(0) == "same_name").then(|| self.is_dead(&previous));
                LeaseReply::Held {
                    holder: previous,
                    value: field(1).to_string(),
                    ttl_left: Duration::from_millis(number.max(0) as u64),
                    same_name_dead,
                }
            }
            other => LeaseReply::Failed {
                error: format!("the lease script answered {other:?}"),
            },
        })
    }

    /// Whether `holder`, which uses our consumer name, is a process of this host that
    /// no longer runs (this worker's previous self, restarted): then its requests ended
    /// with it. A holder on another host, or one that runs, is a live twin.
    fn is_dead(&self, holder: &Holder) -> bool {
        if holder.host.is_empty() || holder.host != self.host || holder.pid == 0 {
            return false;
        }
        holder.pid == std::process::id()
            || !std::path::Path::new(&format!("/proc/{}", holder.pid)).exists()
    }

    /// True when the lease still holds `value` and is extended by one TTL.
    pub fn renew(&self, redis: &mut Redis, value: &str) -> Result<bool, RedisError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RENEW)
            .arg(1)
            .arg(&self.key)
            .arg(value)
            .arg(self.ttl.as_millis() as u64);
        Ok(redis.query::<i64>(&cmd)? == 1)
    }

    /// Leaves the lease marked free for one TTL, when it still holds `value`.
    pub fn release(&self, redis: &mut Redis, value: &str) -> Result<bool, RedisError> {
        let free = serde_json::json!({"free": true, "consumer": self.consumer}).to_string();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RELEASE)
            .arg(1)
            .arg(&self.key)
            .arg(value)
            .arg(free)
            .arg(self.ttl.as_millis() as u64);
        Ok(redis.query::<i64>(&cmd)? == 1)
    }

    /// XACK of `ids`, only while the lease holds `value`: how many were acknowledged, or
    /// `None` when the lease is another's (the entries stay pending for the holder).
    pub fn ack(
        &self,
        redis: &mut Redis,
        names: &Names,
        value: &str,
        ids: &[StreamId],
    ) -> Result<Option<u64>, RedisError> {
        if ids.is_empty() {
            return Ok(Some(0));
        }
        let mut call = ACK_SCRIPT.prepare_invoke();
        call.key(&self.key)
            .key(&names.stream)
            .arg(value)
            .arg(&names.group);
        for id in ids {
            call.arg(id.to_string());
        }
        let acked = redis.invoke::<i64>(&call)?;
        Ok((acked >= 0).then_some(acked as u64))
    }
}

/// This machine, as far as telling a restarted self from a twin needs: the kernel's boot
/// ID and the hostname (two containers on one host share the boot ID, not the name).
fn host_id() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let boot = read("/proc/sys/kernel/random/boot_id");
    let name = read("/proc/sys/kernel/hostname");
    if boot.is_empty() && name.is_empty() {
        return String::new();
    }
    format!("{boot}/{name}")
}

/// Makes every pending entry of the group this consumer's (see [`TAKE_OVER`]): returns
/// how many were moved, and the IDs of those gone from the stream.
pub fn take_over(
    redis: &mut Redis,
    names: &Names,
    lease_value: &str,
) -> Result<(u64, Vec<StreamId>), RedisError> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(TAKE_OVER)
        .arg(2)
        .arg(&names.stream)
        .arg(key(names))
        .arg(&names.group)
        .arg(&names.consumer)
        .arg(lease_value);
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
