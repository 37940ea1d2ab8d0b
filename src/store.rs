//! Everything the worker asks of Redis, in one place: the connection (re-established
//! after any error), the consumer group, reading, acknowledging, dead-lettering and the
//! pending count. The reader and the acker each own a [`Redis`] of their own, so a
//! blocked read never delays an acknowledgement.

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
        Ok(Redis {
            client: redis::Client::open(url)?,
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
    let mut cmd = redis::cmd("XPENDING");
    cmd.arg(&names.stream).arg(&names.group);
    match redis.query::<Value>(&cmd) {
        Ok(Value::Array(summary)) => match summary.first() {
            Some(Value::Int(n)) => Ok(*n as u64),
            _ => Ok(0),
        },
        Ok(_) => Ok(0),
        Err(e) if is_no_group(&e) => Ok(0),
        Err(e) => Err(e),
    }
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
