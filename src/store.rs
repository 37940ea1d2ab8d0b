//! Everything the worker asks of Redis, in one place: the connection (re-established
//! after any error), the consumer group, reading, acknowledging, dead-lettering and the
//! pending count. The reader and the acker each own a [`Redis`] of their own, so a
//! blocked read never delays an acknowledgement.

use std::collections::HashMap;
use std::time::Duration;

use redis::{Connection, ErrorKind, RedisError, Value};

use crate::event::{Entry, Field, StreamId};

/// How long establishing a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The stream, its group and this worker's name in it.
#[derive(Debug, Clone)]
pub struct Names {
    pub stream: String,
    pub group: String,
    pub consumer: String,
    pub dead_letters: String,
}

/// A Redis connection that reconnects on demand. After an error the connection is
/// dropped, and the next command opens a new one.
pub struct Redis {
    client: redis::Client,
    conn: Option<Connection>,
    /// Longer than any BLOCK the owner uses: a read timing out before the server
    /// answers would strand the entries it delivered in the pending list.
    read_timeout: Duration,
}

impl Redis {
    /// Parses the URL; connects only when first used.
    pub fn open(url: &str, read_timeout: Duration) -> Result<Redis, RedisError> {
        Redis::open_with_ca(url, None, read_timeout)
    }

    /// Like [`Redis::open`], trusting the authorities of `ca` (`REDIS_CA_FILE`) besides
    /// the built-in Mozilla roots for a `rediss://` URL.
    pub fn open_with_ca(
        url: &str,
        ca: Option<&crate::config::CaFile>,
        read_timeout: Duration,
    ) -> Result<Redis, RedisError> {
        let client = match ca {
            None => redis::Client::open(url)?,
            Some(ca) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(crate::pusher::with_mozilla_roots_pem(&ca.pem)),
                },
            )?,
        };
        Ok(Redis {
            client,
            conn: None,
            read_timeout,
        })
    }

    fn conn(&mut self) -> Result<&mut Connection, RedisError> {
        if self.conn.is_none() {
            let conn = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
            conn.set_read_timeout(Some(self.read_timeout))?;
            conn.set_write_timeout(Some(self.read_timeout))?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected just above"))
    }

    /// Runs a command; a connection that failed is dropped so the next call reconnects.
    pub fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let result = self.conn().and_then(|c| cmd.query(c));
        if let Err(e) = &result
            && !is_server_reply(e)
        {
            self.conn = None;
        }
        result
    }

    pub fn query_pipeline<T: redis::FromRedisValue>(
        &mut self,
        pipe: &redis::Pipeline,
    ) -> Result<T, RedisError> {
        let result = self.conn().and_then(|c| pipe.query(c));
        if let Err(e) = &result
            && !is_server_reply(e)
        {
            self.conn = None;
        }
        result
    }
}

/// True for an error the server answered (NOGROUP, WRONGTYPE…), after which the
/// connection is still usable.
fn is_server_reply(e: &RedisError) -> bool {
    !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error())
        && e.kind() != ErrorKind::Io
        && e.code().is_some()
        && e.code() != Some("LOADING")
}

/// The stream or the group does not exist (any more).
pub fn is_no_group(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

/// Creates the group at ID 0 (so entries written before the first start are delivered),
/// and the stream with it when absent. An existing group is left as it is.
pub fn ensure_group(redis: &mut Redis, names: &Names) -> Result<bool, RedisError> {
    let mut cmd = redis::cmd("XGROUP");
    cmd.arg("CREATE")
        .arg(&names.stream)
        .arg(&names.group)
        .arg("0")
        .arg("MKSTREAM");
    match redis.query::<()>(&cmd) {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Where a read starts: this consumer's own pending entries after an ID, or new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    Pending(StreamId),
    New,
}

/// XREADGROUP for this consumer. `block` applies to new entries only.
pub fn read(
    redis: &mut Redis,
    names: &Names,
    cursor: Cursor,
    count: usize,
    block: Duration,
) -> Result<Vec<Entry>, RedisError> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(&names.group)
        .arg(&names.consumer)
        .arg("COUNT")
        .arg(count);
    let from = match cursor {
        Cursor::Pending(after) => after.to_string(),
        Cursor::New => {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
            ">".to_string()
        }
    };
    cmd.arg("STREAMS").arg(&names.stream).arg(from);
    let reply: Value = redis.query(&cmd)?;
    match reply {
        Value::Nil => Ok(Vec::new()),
        Value::Array(mut streams) => match streams.pop() {
            Some(Value::Array(mut pair)) if pair.len() == 2 => {
                crate::event::entries_from(pair.pop().unwrap_or(Value::Nil)).map_err(unexpected)
            }
            None => Ok(Vec::new()),
            other => Err(unexpected(format!("XREADGROUP answered {other:?}"))),
        },
        other => Err(unexpected(format!("XREADGROUP answered {other:?}"))),
    }
}

fn unexpected(detail: String) -> RedisError {
    RedisError::from((ErrorKind::UnexpectedReturnType, "unexpected reply", detail))
}

/// XACK of a batch of entries.
pub fn ack(redis: &mut Redis, names: &Names, ids: &[StreamId]) -> Result<(), RedisError> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut cmd = redis::cmd("XACK");
    cmd.arg(&names.stream).arg(&names.group);
    for id in ids {
        cmd.arg(id.to_string());
    }
    redis.query::<u64>(&cmd).map(|_| ())
}

/// What the dead-letter stream records of a refused entry, after its original fields.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: StreamId,
    pub fields: Vec<Field>,
    pub reason: String,
    /// The HTTP status the plugin answered, when it answered.
    pub status: Option<u16>,
    pub attempts: u32,
    pub detail: String,
}

/// The fields appended to the original ones, in this order; `dead replay` strips them.
pub const DEAD_LETTER_FIELDS: [&str; 6] = [
    "original_id",
    "reason",
    "status",
    "attempts",
    "dead_at",
    "detail",
];

/// Moves an entry to the dead-letter stream: XADD there and XACK here in one
/// MULTI/EXEC, so it is never in neither place nor acknowledged without a copy.
pub fn dead_letter(redis: &mut Redis, names: &Names, dead: &DeadLetter) -> Result<(), RedisError> {
    let mut add = redis::cmd("XADD");
    add.arg(&names.dead_letters).arg("*");
    for (name, value) in &dead.fields {
        add.arg(name.as_slice()).arg(value.as_slice());
    }
    let values = [
        dead.id.to_string(),
        dead.reason.clone(),
        dead.status.map(|s| s.to_string()).unwrap_or_default(),
        dead.attempts.to_string(),
        crate::clock::rfc3339(std::time::SystemTime::now()),
        dead.detail.clone(),
    ];
    for (name, value) in DEAD_LETTER_FIELDS.iter().zip(values) {
        add.arg(*name).arg(value);
    }
    let mut ack = redis::cmd("XACK");
    ack.arg(&names.stream)
        .arg(&names.group)
        .arg(dead.id.to_string());
    let mut pipe = redis::pipe();
    pipe.atomic().add_command(add).add_command(ack);
    redis.query_pipeline::<Value>(&pipe).map(|_| ())
}

/// Entries the group has read and not acknowledged; 0 when the group does not exist.
pub fn pending_count(redis: &mut Redis, names: &Names) -> Result<u64, RedisError> {
    pending_summary(redis, names).map(|(count, _)| count)
}

/// The XPENDING summary: how many entries are pending and the oldest one's ID.
pub fn pending_summary(
    redis: &mut Redis,
    names: &Names,
) -> Result<(u64, Option<StreamId>), RedisError> {
    let mut cmd = redis::cmd("XPENDING");
    cmd.arg(&names.stream).arg(&names.group);
    match redis.query::<Value>(&cmd) {
        Ok(summary) => Ok(parse_pending_summary(&summary)),
        Err(e) if is_no_group(&e) => Ok((0, None)),
        Err(e) => Err(e),
    }
}

fn parse_pending_summary(summary: &Value) -> (u64, Option<StreamId>) {
    let Value::Array(summary) = summary else {
        return (0, None);
    };
    let count = match summary.first() {
        Some(Value::Int(n)) => *n as u64,
        _ => 0,
    };
    let oldest = match summary.get(1) {
        Some(Value::BulkString(id)) => String::from_utf8_lossy(id).parse().ok(),
        _ => None,
    };
    (count, oldest)
}

/// What /health and /metrics show of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    pub pending: u64,
    pub oldest_pending: Option<StreamId>,
    /// `None` when Redis cannot tell.
    pub lag: Option<u64>,
    pub dead_letters: u64,
}

/// The pending summary, the group's lag and the dead-letter count in one round trip
/// (XPENDING, XINFO GROUPS and XLEN pipelined): the reader refreshes them while idle,
/// and every reply is a wake-up.
pub fn queue_stats(redis: &mut Redis, names: &Names) -> Result<QueueStats, RedisError> {
    let mut pipe = redis::pipe();
    add_stats_cmds(&mut pipe, names);
    let replies: Vec<Value> = redis.query_pipeline(&pipe)?;
    if replies.len() != 3 {
        return Err(unexpected(format!("expected 3 replies, got {replies:?}")));
    }
    Ok(parse_stats(&replies, &names.group))
}

fn add_stats_cmds(pipe: &mut redis::Pipeline, names: &Names) {
    pipe.cmd("XPENDING").arg(&names.stream).arg(&names.group);
    pipe.cmd("XINFO").arg("GROUPS").arg(&names.stream);
    pipe.cmd("XLEN").arg(&names.dead_letters);
}

/// The replies of [`add_stats_cmds`], in order.
fn parse_stats(replies: &[Value], group: &str) -> QueueStats {
    let (pending, oldest_pending) = parse_pending_summary(&replies[0]);
    QueueStats {
        pending,
        oldest_pending,
        lag: parse_lag(&replies[1], group),
        dead_letters: match &replies[2] {
            Value::Int(n) => *n as u64,
            _ => 0,
        },
    }
}

/// What one XAUTOCLAIM round took over.
#[derive(Debug, Default)]
pub struct Claimed {
    pub entries: Vec<Entry>,
    /// Pending entries that no longer exist in the stream (trimmed or deleted before
    /// delivery); Redis 7 drops them from the pending list and reports them here.
    pub vanished: Vec<StreamId>,
    /// Where the next round starts; `0-0` when the pending list was scanned to its end.
    pub next: StreamId,
}

/// XAUTOCLAIM: takes over up to `count` entries of any consumer of the group that have
/// been idle for `min_idle`, starting at `start`.
pub fn autoclaim(
    redis: &mut Redis,
    names: &Names,
    min_idle: Duration,
    start: StreamId,
    count: usize,
) -> Result<Claimed, RedisError> {
    parse_claimed(redis.query(&autoclaim_cmd(names, min_idle, start, count))?)
}

fn autoclaim_cmd(names: &Names, min_idle: Duration, start: StreamId, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("XAUTOCLAIM");
    cmd.arg(&names.stream)
        .arg(&names.group)
        .arg(&names.consumer)
        .arg(min_idle.as_millis() as u64)
        .arg(start.to_string())
        .arg("COUNT")
        .arg(count);
    cmd
}

fn parse_claimed(reply: Value) -> Result<Claimed, RedisError> {
    let Value::Array(mut parts) = reply else {
        return Err(unexpected(format!("XAUTOCLAIM answered {reply:?}")));
    };
    let vanished = if parts.len() == 3 { parts.pop() } else { None };
    let entries = parts.pop().unwrap_or(Value::Nil);
    let next = match parts.pop() {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(&b).parse().map_err(unexpected)?,
        other => return Err(unexpected(format!("XAUTOCLAIM cursor {other:?}"))),
    };
    let entries = crate::event::entries_from(entries).map_err(unexpected)?;
    let vanished = match vanished {
        Some(Value::Array(ids)) => ids
            .into_iter()
            .filter_map(|v| match v {
                Value::BulkString(b) => String::from_utf8_lossy(&b).parse().ok(),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(Claimed {
        entries,
        vanished,
        next,
    })
}

/// The reader's periodic round, in one round trip (every reply is a wake-up of an
/// otherwise idle worker): the first XAUTOCLAIM of entries idle longer than
/// `min_idle`, and the figures of [`queue_stats`].
pub fn housekeeping(
    redis: &mut Redis,
    names: &Names,
    min_idle: Duration,
    count: usize,
) -> Result<(Claimed, QueueStats), RedisError> {
    let mut pipe = redis::pipe();
    pipe.add_command(autoclaim_cmd(names, min_idle, StreamId::default(), count));
    add_stats_cmds(&mut pipe, names);
    let mut replies: Vec<Value> = redis.query_pipeline(&pipe)?;
    if replies.len() != 4 {
        return Err(unexpected(format!("expected 4 replies, got {replies:?}")));
    }
    let stats = parse_stats(&replies[1..], &names.group);
    let claimed = parse_claimed(replies.swap_remove(0))?;
    Ok((claimed, stats))
}

/// How many times each of this consumer's pending entries from `from` to `to` has
/// been delivered, as XPENDING's extended form reports it.
pub fn delivery_counts(
    redis: &mut Redis,
    names: &Names,
    from: StreamId,
    to: StreamId,
    count: usize,
) -> Result<HashMap<StreamId, u64>, RedisError> {
    let mut cmd = redis::cmd("XPENDING");
    cmd.arg(&names.stream)
        .arg(&names.group)
        .arg(from.to_string())
        .arg(to.to_string())
        .arg(count)
        .arg(&names.consumer);
    let rows: Vec<(String, String, u64, u64)> = redis.query(&cmd)?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, _, _, deliveries)| Some((id.parse().ok()?, deliveries)))
        .collect())
}

/// Resets the idle time of entries this worker holds (XCLAIM … JUSTID, which leaves
/// their delivery count alone), so another instance never takes over an entry that
/// is in flight or parked here.
pub fn touch(redis: &mut Redis, names: &Names, ids: &[StreamId]) -> Result<(), RedisError> {
    for chunk in ids.chunks(512) {
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&names.stream)
            .arg(&names.group)
            .arg(&names.consumer)
            .arg(0);
        for id in chunk {
            cmd.arg(id.to_string());
        }
        cmd.arg("JUSTID");
        redis.query::<Value>(&cmd)?;
    }
    Ok(())
}

/// The group's lag in an XINFO GROUPS reply: entries in the stream not yet read by
/// the group. `None` when Redis cannot tell (after a deletion or trimming in the read
/// range).
fn parse_lag(groups: &Value, group_name: &str) -> Option<u64> {
    let Value::Array(groups) = groups else {
        return None;
    };
    for group in groups {
        let fields: Vec<Value> = match group {
            Value::Array(f) => f.clone(),
            Value::Map(m) => m.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect(),
            _ => continue,
        };
        let mut name = None;
        let mut lag = None;
        for pair in fields.chunks(2) {
            match pair {
                [Value::BulkString(k), Value::BulkString(n)] if k == b"name" => {
                    name = Some(n.clone())
                }
                [Value::BulkString(k), Value::Int(n)] if k == b"lag" => lag = Some(*n as u64),
                _ => {}
            }
        }
        if name.as_deref() == Some(group_name.as_bytes()) {
            return lag;
        }
    }
    None
}

/// Waits before reconnection attempt `n` (0-based): 100 ms doubling to 5 s.
pub fn reconnect_delay(n: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << n.min(6))).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_grow_then_cap() {
        let d: Vec<u64> = (0..9)
            .map(|n| reconnect_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(d, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }
}
