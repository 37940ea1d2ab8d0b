//! Everything the worker asks of Redis, in one place: the connection (re-established
//! after any error), the server's version, the consumer group, reading, acknowledging,
//! dead-lettering and the pending count. The reader and the acker each own a [`Redis`]
//! of their own, so a blocked read never delays an acknowledgement.
//!
//! Three moves must be atomic and are each one server-side Lua script (EVALSHA, loaded
//! on first use): reading new entries together with the count of those the producer's
//! MAXLEN trimmed before the group read them ([`read_new`]); re-reading pending entries
//! without raising their delivery count ([`read_pending`]); and moving an entry to the
//! dead letters, which writes the copy and acknowledges only while the entry is still
//! pending ([`dead_letter`]). A script that fails part-way writes nothing, since each
//! checks what could fail before its first write.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{Connection, ErrorKind, RedisError, Script, Value};

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

    /// Runs a script with EVALSHA, loading it first when the server does not know it
    /// (a new or restarted Redis).
    pub fn invoke<T: redis::FromRedisValue>(
        &mut self,
        script: &redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        let result = self.conn().and_then(|c| script.invoke(c));
        if let Err(e) = &result
            && !is_server_reply(e)
        {
            self.conn = None;
        }
        result
    }
}

/// A Redis server version, as `INFO server` gives it (`redis_version:7.0.15`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Version, String> {
        let mut parts = s.trim().splitn(3, '.').map(|p| {
            // "7.2.4-rc1" and the like: the leading digits count.
            let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>()
        });
        match (parts.next(), parts.next(), parts.next().unwrap_or(Ok(0))) {
            (Some(Ok(major)), Some(Ok(minor)), Ok(patch)) => Ok(Version {
                major,
                minor,
                patch,
            }),
            _ => Err(format!("not a Redis version: {s:?}")),
        }
    }
}

/// What the worker can do with a given Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Redis 7 or later: everything, including the exact count of the entries the
    /// producer's MAXLEN trimmed before the group read them (XINFO STREAM's
    /// entries-added appeared in 7.0).
    Full,
    /// Redis 6.2: everything but that count; such entries are lost without a word.
    NoTrimCount,
    /// Before 6.2: no XAUTOCLAIM, nor the exclusive ranges of XPENDING; the worker
    /// refuses to run.
    TooOld,
}

impl Support {
    pub fn of(version: Version) -> Support {
        let v = (version.major, version.minor);
        if v >= (7, 0) {
            Support::Full
        } else if v >= (6, 2) {
            Support::NoTrimCount
        } else {
            Support::TooOld
        }
    }

    /// What an operator is told, at start and by `check`; `None` when all is well.
    pub fn warning(self, version: Version) -> Option<String> {
        match self {
            Support::Full => None,
            Support::NoTrimCount => Some(format!(
                "Redis {version} cannot count the tickets its MAXLEN trims before they are \
                 read: such losses go unnoticed; Redis 7 or later counts them"
            )),
            Support::TooOld => Some(format!(
                "Redis {version} is too old: paheko-push needs Redis 6.2 or later (XAUTOCLAIM)"
            )),
        }
    }
}

/// The server's version, from `INFO server`.
pub fn server_version(redis: &mut Redis) -> Result<Version, RedisError> {
    let info: String = redis.query(redis::cmd("INFO").arg("server"))?;
    version_in_info(&info).map_err(unexpected)
}

fn version_in_info(info: &str) -> Result<Version, String> {
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .ok_or_else(|| "INFO server names no redis_version".to_string())?
        .parse()
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

/// Makes this consumer known to the group (XGROUP CREATECONSUMER, Redis 6.2), so that
/// XINFO CONSUMERS shows the worker as soon as it is ready: a non-blocking XREADGROUP
/// that finds nothing, as [`read_new`]'s, does not create it.
pub fn ensure_consumer(redis: &mut Redis, names: &Names) -> Result<(), RedisError> {
    let mut cmd = redis::cmd("XGROUP");
    cmd.arg("CREATECONSUMER")
        .arg(&names.stream)
        .arg(&names.group)
        .arg(&names.consumer);
    redis.query::<i64>(&cmd).map(|_| ())
}

/// Where a read starts: this consumer's own pending entries after an ID, or new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    Pending(StreamId),
    New,
}

/// XREADGROUP of new entries for this consumer, blocking up to `block`: the read of a
/// Redis that cannot count trimmed entries (6.2). See [`read_new`] for Redis 7.
pub fn read_blocking(
    redis: &mut Redis,
    names: &Names,
    count: usize,
    block: Duration,
) -> Result<Vec<Entry>, RedisError> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(&names.group)
        .arg(&names.consumer)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(&names.stream)
        .arg(">");
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

/// Entries the producer's MAXLEN trimmed from the stream after the group last read and
/// before anyone read them: their tickets never reached Paheko. The bounds are those
/// Redis still knows, both exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    pub count: u64,
    /// The last entry the group read before the gap (`0-0` when it had read none).
    pub after: StreamId,
    /// The first entry still in the stream after the gap.
    pub before: StreamId,
    /// The `trimmed` record written to the dead-letter stream for it.
    pub record: StreamId,
}

/// What one [`read_new`] gave.
#[derive(Debug, Default)]
pub struct NewEntries {
    pub entries: Vec<Entry>,
    /// The group's last-delivered ID before the read: where to wait from
    /// ([`wait_for_new`]) when nothing was read.
    pub last_delivered: StreamId,
    /// The gap found, and recorded, just before the read.
    pub trimmed: Option<Trimmed>,
    /// False when how many entries the stream had received at the group's last read
    /// was unknown (something else moved the group, or entries were deleted with XDEL)
    /// while entries before the stream's first one may have been trimmed: such a gap
    /// cannot be counted.
    pub counted: bool,
}

/// The Redis 7 read of new entries, one script so that nothing can slip in between:
/// compares XINFO STREAM (entries-added, length, first entry) with how many entries
/// the stream had received when the group last read (its last-delivered-id); when
/// entries after the group's last read are no longer in the stream, it writes one
/// `trimmed` dead letter (`count`, `after_id`, `before_id`) and remembers it in the set
/// of [`trimmed_key`]; only then does it run a non-blocking XREADGROUP, and it records
/// the new count beside the group ([`read_count_key`]). Checking in one round trip and
/// reading in another would leave a window in which the producer trims and the read
/// jumps the gap unseen.
///
/// The count is our own rather than the group's entries-read: Redis 7.0 does not carry
/// entries-read through an AOF reload or to a replica (it replays the reads as XCLAIMs
/// that move the group without it), and leaves it short by the gap after a read that
/// jumped one, so the next gap would be miscounted. Ours is written with the ID it
/// belongs to, so a count that does not match the group's position is never used:
/// without it, the count is known only at `0-0` and when the group has read the
/// stream's last entry.
static READ_NEW: LazyLock<Script> = LazyLock::new(|| Script::new(READ_NEW_LUA));

const READ_NEW_LUA: &str = r#"
local stream, dead, trimmed, counter = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, consumer, count, dead_at = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('GET', KEYS[5]) ~= ARGV[5] then
  return redis.error_reply('NOTHOLDER the lease is no longer this instance\'s')
end
if redis.call('EXISTS', stream) == 0 then
  return redis.error_reply('NOGROUP no stream ' .. stream)
end
local function map(flat)
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = flat[i + 1] end
  return m
end
-- Stream IDs as text, compared exactly (no float rounding of a large sequence).
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local g
for _, raw in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local m = map(raw)
  if m['name'] == group then g = m break end
end
if not g then
  return redis.error_reply('NOGROUP no group ' .. group .. ' on ' .. stream)
end
local last = g['last-delivered-id']
local s = map(redis.call('XINFO', 'STREAM', stream))
local added, length, newest = s['entries-added'], s['length'], s['last-generated-id']
-- How many entries the stream had received up to `last`: our own count, kept beside
-- the group with the ID it belongs to, or what is exact without it.
local mark = redis.call('HMGET', counter, 'id', 'read')
local read
if mark[1] == last then read = tonumber(mark[2])
elseif last == '0-0' then read = 0
elseif last == newest then read = added end
local first = s['first-entry']
local gap, counted = {}, 1
if first and before(last, first[1]) then
  if not read then
    counted = 0
  else
    local lost = added - length - read
    if lost > 0 then
      for _, key in ipairs({{dead, 'stream'}, {trimmed, 'set'}}) do
        local t = redis.call('TYPE', key[1])['ok']
        if t ~= 'none' and t ~= key[2] then
          return redis.error_reply('WRONGTYPE ' .. key[1] .. ' holds a ' .. t ..
            ', not a ' .. key[2] .. ': cannot record ' .. lost .. ' trimmed entries')
        end
      end
      local detail = lost .. ' entries written to ' .. stream .. ' after ' .. last ..
        ' and before ' .. first[1] .. ' were trimmed (MAXLEN) before paheko-push read' ..
        ' them: they never reached Paheko and cannot be replayed'
      local id = redis.call('XADD', dead, '*', 'count', lost, 'after_id', last,
        'before_id', first[1], 'original_id', '', 'reason', 'trimmed', 'status', '',
        'attempts', 0, 'dead_at', dead_at, 'detail', detail)
      redis.call('SADD', trimmed, id)
      gap = {lost, last, first[1], id}
      read = added - length
    end
  end
end
local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
  'STREAMS', stream, '>')
local entries = {}
if reply then entries = reply[1][2] end
if #entries > 0 then
  local now = entries[#entries][1]
  if now == newest then
    redis.call('HSET', counter, 'id', now, 'read', added)
  elseif read and not before(last, s['max-deleted-entry-id']) then
    -- Nothing deleted after `last`: what was read is all the stream received since.
    redis.call('HSET', counter, 'id', now, 'read', read + #entries)
  elseif mark[1] then
    redis.call('DEL', counter)
  end
end
return {entries, last, gap, counted}
"#;

/// Reads up to `count` new entries for this consumer without blocking, after
/// recording any entries trimmed before the group read them (Redis 7; see
/// [`READ_NEW`]).
/// Only while the lease holds `lease_value`: a holder that lost it reads nothing more.
pub fn read_new(
    redis: &mut Redis,
    names: &Names,
    lease_value: &str,
    count: usize,
) -> Result<NewEntries, RedisError> {
    let dead_at = crate::clock::rfc3339(std::time::SystemTime::now());
    let mut call = READ_NEW.prepare_invoke();
    call.key(&names.stream)
        .key(&names.dead_letters)
        .key(trimmed_key(&names.dead_letters))
        .key(read_count_key(names))
        .key(crate::lease::key(names))
        .arg(&names.group)
        .arg(&names.consumer)
        .arg(count)
        .arg(dead_at)
        .arg(lease_value);
    parse_new(redis.invoke(&call)?)
}

fn parse_new(reply: Value) -> Result<NewEntries, RedisError> {
    let Value::Array(parts) = reply else {
        return Err(unexpected(format!("the read script answered {reply:?}")));
    };
    let [entries, last, gap, counted] = <[Value; 4]>::try_from(parts)
        .map_err(|p| unexpected(format!("the read script answered {p:?}")))?;
    let trimmed = match gap {
        Value::Array(g) if g.is_empty() => None,
        Value::Array(g) if g.len() == 4 => Some(Trimmed {
            count: redis::from_redis_value_ref(&g[0])?,
            after: id_of(&g[1])?,
            before: id_of(&g[2])?,
            record: id_of(&g[3])?,
        }),
        other => return Err(unexpected(format!("the read script's gap is {other:?}"))),
    };
    Ok(NewEntries {
        entries: crate::event::entries_from(entries).map_err(unexpected)?,
        last_delivered: id_of(&last)?,
        trimmed,
        counted: counted != Value::Int(0),
    })
}

fn id_of(v: &Value) -> Result<StreamId, RedisError> {
    let text: String = redis::from_redis_value_ref(v)?;
    text.parse().map_err(unexpected)
}

/// Blocks up to `block` until the stream holds an entry after `after` (XREAD, which
/// leaves the group alone); true when there is one. The worker waits with this rather
/// than with XREADGROUP BLOCK, which would deliver what the producer wrote meanwhile
/// without [`read_new`]'s check: a producer writing past its MAXLEN in one go would
/// have its trimmed entries jumped unseen.
pub fn wait_for_new(
    redis: &mut Redis,
    names: &Names,
    after: StreamId,
    block: Duration,
) -> Result<bool, RedisError> {
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(&names.stream)
        .arg(after.to_string());
    let reply: Value = redis.query(&cmd)?;
    Ok(reply != Value::Nil)
}

/// The set of the `trimmed` dead letters' IDs, beside the dead-letter stream: what
/// /health counts (a stream cannot be searched by field). `dead drop` removes from it;
/// IDs no longer in the dead-letter stream are pruned when counted.
pub fn trimmed_key(dead_letters: &str) -> String {
    format!("{dead_letters}:trimmed")
}

/// The hash beside the group where [`read_new`] keeps how many entries the stream had
/// received up to the group's last read (`read`), with that entry's ID (`id`).
pub fn read_count_key(names: &Names) -> String {
    format!("{}:read:{}", names.stream, names.group)
}

/// An entry of a pending list, read back without being delivered again.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingEntry {
    pub entry: Entry,
    /// How many times Redis delivered it to a consumer so far.
    pub deliveries: u64,
}

/// XPENDING for the IDs and delivery counts of `owner`'s pending entries after `after`,
/// XRANGE for their fields, and XCLAIM … JUSTID of those still in the stream to this
/// consumer, which resets their idle time without counting a delivery (XREADGROUP
/// with an ID would count one each time, and reconnections and restarts would push
/// tickets past PAHEKO_PUSH_MAX_DELIVERIES). An entry XRANGE no longer finds comes back
/// without fields: it was trimmed or deleted after it was read, and stays pending
/// until acknowledged.
static READ_PENDING: LazyLock<Script> = LazyLock::new(|| Script::new(READ_PENDING_LUA));

const READ_PENDING_LUA: &str = r#"
local stream = KEYS[1]
local group, owner, consumer, start, count = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local rows = redis.call('XPENDING', stream, group, start, '+', count, owner)
local out, claim = {}, {'XCLAIM', stream, group, consumer, 0}
for i, row in ipairs(rows) do
  local found = redis.call('XRANGE', stream, row[1], row[1])
  local fields = false
  if #found == 1 then
    fields = found[1][2]
    claim[#claim + 1] = row[1]
  end
  out[i] = {row[1], row[4], fields}
end
if #claim > 5 then
  claim[#claim + 1] = 'JUSTID'
  redis.call(unpack(claim))
end
return out
"#;

/// Up to `count` of this consumer's pending entries after `after`, in stream order,
/// with their delivery counts; see [`READ_PENDING`].
pub fn read_pending(
    redis: &mut Redis,
    names: &Names,
    after: Option<StreamId>,
    count: usize,
) -> Result<Vec<PendingEntry>, RedisError> {
    let start = after.map_or("-".to_string(), |id| format!("({id}"));
    let mut call = READ_PENDING.prepare_invoke();
    call.key(&names.stream)
        .arg(&names.group)
        .arg(&names.consumer)
        .arg(&names.consumer)
        .arg(start)
        .arg(count);
    pending_rows(redis.invoke(&call)?)
}

/// Rows of `{id, deliveries, fields or false}` as pending entries.
fn pending_rows(reply: Value) -> Result<Vec<PendingEntry>, RedisError> {
    let Value::Array(rows) = reply else {
        return Err(unexpected(format!("the pending script answered {reply:?}")));
    };
    rows.into_iter()
        .map(|row| {
            let Value::Array(row) = row else {
                return Err(unexpected(format!("a pending row is {row:?}")));
            };
            let [id, deliveries, fields] = <[Value; 3]>::try_from(row)
                .map_err(|r| unexpected(format!("a pending row is {r:?}")))?;
            let deliveries = redis::from_redis_value_ref(&deliveries)?;
            let pair = Value::Array(vec![id, fields]);
            let entry = crate::event::entries_from(Value::Array(vec![pair]))
                .map_err(unexpected)?
                .pop()
                .ok_or_else(|| unexpected("a pending row without its entry".into()))?;
            Ok(PendingEntry { entry, deliveries })
        })
        .collect()
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

/// What [`dead_letter`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLettered {
    /// Copied to the dead-letter stream and acknowledged.
    Moved,
    /// Not pending for the group (any more): nothing was written. A repeat of a move
    /// whose answer was lost, or an entry another instance settled.
    WasNotPending,
    /// The lease holds another value: nothing was written, the entry is the holder's.
    NotHolder,
}

/// Moves an entry to the dead letters: XPENDING checks it is still pending for the
/// group, XADD writes the copy, XACK acknowledges it, in one script. Redis does not
/// roll a MULTI/EXEC back, so there an XADD refused (the key holds another type:
/// WRONGTYPE) was followed by the XACK all the same, and the ticket was in neither
/// place; here the script stops at the failed XADD and the entry stays pending. A
/// repeat after a lost answer finds it no longer pending and writes nothing twice.
static DEAD_LETTER: LazyLock<Script> = LazyLock::new(|| Script::new(DEAD_LETTER_LUA));

const DEAD_LETTER_LUA: &str = r#"
local stream, dead, lease = KEYS[1], KEYS[2], KEYS[3]
local group, id = ARGV[1], ARGV[2]
if redis.call('GET', lease) ~= ARGV[3] then return -1 end
local ok, pending = pcall(redis.call, 'XPENDING', stream, group, id, id, 1)
if not ok then
  if string.sub(pending.err or '', 1, 7) == 'NOGROUP' then return 0 end
  return redis.error_reply(pending.err)
end
if #pending == 0 then return 0 end
local add = {'XADD', dead, '*'}
for i = 4, #ARGV do add[#add + 1] = ARGV[i] end
redis.call(unpack(add))
redis.call('XACK', stream, group, id)
return 1
"#;

/// Moves an entry to the dead-letter stream, once, while the lease at `lease_key` holds
/// `lease_value`; see [`DEAD_LETTER`]. On an error nothing was written and the entry is
/// still pending: try again.
pub fn dead_letter(
    redis: &mut Redis,
    names: &Names,
    lease_key: &str,
    lease_value: &str,
    dead: &DeadLetter,
) -> Result<DeadLettered, RedisError> {
    let id = dead.id.to_string();
    let mut call = DEAD_LETTER.prepare_invoke();
    call.key(&names.stream)
        .key(&names.dead_letters)
        .key(lease_key)
        .arg(&names.group)
        .arg(&id)
        .arg(lease_value);
    for (name, value) in &dead.fields {
        call.arg(name.as_slice()).arg(value.as_slice());
    }
    let values = [
        id.clone(),
        dead.reason.clone(),
        dead.status.map(|s| s.to_string()).unwrap_or_default(),
        dead.attempts.to_string(),
        crate::clock::rfc3339(std::time::SystemTime::now()),
        dead.detail.clone(),
    ];
    for (name, value) in DEAD_LETTER_FIELDS.iter().zip(values) {
        call.arg(*name).arg(value);
    }
    Ok(moved(redis.invoke::<i64>(&call)?))
}

fn moved(answer: i64) -> DeadLettered {
    match answer {
        1 => DeadLettered::Moved,
        -1 => DeadLettered::NotHolder,
        _ => DeadLettered::WasNotPending,
    }
}

/// Records an entry that vanished from the stream while pending (trimmed by the
/// producer's MAXLEN after it was read) as one `trimmed` dead letter — count 1, its ID,
/// and exclusive bounds around it as a gap's — and acknowledges it, while the lease holds ARGV[2]. Once per ID: the set KEYS[5]
/// remembers the IDs recorded, so a repeat after a lost answer writes nothing twice.
/// The record is written even when Redis already dropped the entry from the pending
/// list (XAUTOCLAIM does so with deleted entries): it is the only trace left.
static VANISHED: LazyLock<Script> = LazyLock::new(|| Script::new(VANISHED_LUA));

const VANISHED_LUA: &str = r#"
local stream, dead, lease, trimmed, recorded = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, value, id, dead_at, after, before = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('GET', lease) ~= value then return -1 end
if redis.call('SISMEMBER', recorded, id) == 1 then
  redis.call('XACK', stream, group, id)
  return 0
end
local detail = 'entry ' .. id .. ' was read but trimmed from ' .. stream ..
  ' (MAXLEN) before it was delivered: it never reached Paheko and cannot be replayed'
local record = redis.call('XADD', dead, '*', 'count', 1, 'after_id', after, 'before_id', before,
  'original_id', id, 'reason', 'trimmed', 'status', '', 'attempts', 0, 'dead_at', dead_at,
  'detail', detail)
redis.call('SADD', trimmed, record)
redis.call('SADD', recorded, id)
redis.call('XACK', stream, group, id)
return 1
"#;

/// Resets the idle time of entries this worker holds (XCLAIM … JUSTID, which leaves
/// their delivery count alone), so that no other program's XAUTOCLAIM takes over an
/// entry in flight or parked here. Only entries still in the stream are touched: XCLAIM
/// on one the producer's MAXLEN trimmed drops it from the pending list unseen (Redis 7),
/// and then its dead letter found it "no longer pending" (issue 13, 10). Those held here
/// are delivered or dead-lettered from memory as usual.
static TOUCH: LazyLock<Script> = LazyLock::new(|| Script::new(TOUCH_LUA));

const TOUCH_LUA: &str = r#"
local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  if #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) == 1 then
    claim[#claim + 1] = ARGV[i]
  end
end
if #claim == 5 then return 0 end
claim[#claim + 1] = 'JUSTID'
return #redis.call(unpack(claim))
"#;

/// See [`TOUCH`].
pub fn touch(redis: &mut Redis, names: &Names, ids: &[StreamId]) -> Result<(), RedisError> {
    for chunk in ids.chunks(512) {
        let mut call = TOUCH.prepare_invoke();
        call.key(&names.stream)
            .arg(&names.group)
            .arg(&names.consumer);
        for id in chunk {
            call.arg(id.to_string());
        }
        redis.invoke::<i64>(&call)?;
    }
    Ok(())
}

/// The set of entry IDs recorded as vanished ([`record_vanished`]).
pub fn vanished_key(dead_letters: &str) -> String {
    format!("{dead_letters}:vanished")
}

/// See [`VANISHED`].
pub fn record_vanished(
    redis: &mut Redis,
    names: &Names,
    lease_key: &str,
    lease_value: &str,
    id: StreamId,
) -> Result<DeadLettered, RedisError> {
    let mut call = VANISHED.prepare_invoke();
    call.key(&names.stream)
        .key(&names.dead_letters)
        .key(lease_key)
        .key(trimmed_key(&names.dead_letters))
        .key(vanished_key(&names.dead_letters))
        .arg(&names.group)
        .arg(lease_value)
        .arg(id.to_string())
        .arg(crate::clock::rfc3339(std::time::SystemTime::now()));
    // Exclusive bounds, as a gap's: the IDs just before and just after this one.
    let after = match id.seq {
        0 => StreamId {
            ms: id.ms.saturating_sub(1),
            seq: u64::MAX,
        },
        seq => StreamId {
            ms: id.ms,
            seq: seq - 1,
        },
    };
    let before = StreamId {
        ms: id.ms,
        seq: id.seq.saturating_add(1),
    };
    call.arg(after.to_string()).arg(before.to_string());
    Ok(moved(redis.invoke::<i64>(&call)?))
}

/// Takes over up to ARGV[4] entries of *other* consumers idle longer than ARGV[3] ms
/// (a tool's, or a worker's that is not paheko-push; the standbys read nothing, and a
/// new holder takes every pending entry over at once). This consumer's own entries are
/// never claimed here: a lane may have left some in Redis on purpose (the budget).
/// Entries gone from the stream are not claimed — XCLAIM would drop them from the
/// pending list unseen — but returned, to be recorded. Returns {{id, deliveries,
/// fields}...}, {gone ids}.
static CLAIM_IDLE: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_IDLE_LUA));

const CLAIM_IDLE_LUA: &str = r#"
local stream = KEYS[1]
local group, consumer, idle, count = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local out, gone, start = {}, {}, '-'
while #out + #gone < count do
  local rows = redis.call('XPENDING', stream, group, 'IDLE', idle, start, '+', 1000)
  if #rows == 0 then break end
  for _, row in ipairs(rows) do
    if row[2] ~= consumer and #out + #gone < count then
      local found = redis.call('XRANGE', stream, row[1], row[1])
      if #found == 0 then
        table.insert(gone, row[1])
      else
        local claimed = redis.call('XCLAIM', stream, group, consumer, idle, row[1])
        if #claimed == 1 then
          table.insert(out, {row[1], row[4] + 1, claimed[1][2]})
        end
      end
    end
  end
  if #rows < 1000 then break end
  start = '(' .. rows[#rows][1]
end
return {out, gone}
"#;

/// See [`CLAIM_IDLE`]: the entries taken over, with their delivery counts, and the IDs
/// of those gone from the stream.
pub fn claim_idle(
    redis: &mut Redis,
    names: &Names,
    min_idle: Duration,
    count: usize,
) -> Result<(Vec<PendingEntry>, Vec<StreamId>), RedisError> {
    let mut call = CLAIM_IDLE.prepare_invoke();
    call.key(&names.stream)
        .arg(&names.group)
        .arg(&names.consumer)
        .arg(min_idle.as_millis() as u64)
        .arg(count);
    let reply: Value = redis.invoke(&call)?;
    let Value::Array(mut parts) = reply else {
        return Err(unexpected(format!("the claim script answered {reply:?}")));
    };
    let gone = match parts.pop() {
        Some(Value::Array(ids)) => ids.iter().map(id_of).collect::<Result<Vec<_>, _>>()?,
        other => return Err(unexpected(format!("the claim script answered {other:?}"))),
    };
    let rows = match parts.pop() {
        Some(rows) => rows,
        None => return Err(unexpected("the claim script answered nothing".into())),
    };
    Ok((pending_rows(rows)?, gone))
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
    /// `trimmed` records still in the dead-letter stream: tickets lost before they
    /// were read, until an operator drops the records.
    pub trimmed_records: u64,
}

/// The pending summary, the group's lag and the dead-letter counts in one round trip
/// (XPENDING, XINFO GROUPS, XLEN and SMEMBERS pipelined), plus one more only while
/// `trimmed` records exist: the reader refreshes them while idle, and every reply is
/// a wake-up.
pub fn queue_stats(redis: &mut Redis, names: &Names) -> Result<QueueStats, RedisError> {
    let mut pipe = redis::pipe();
    add_stats_cmds(&mut pipe, names);
    let replies: Vec<Value> = redis.query_pipeline(&pipe)?;
    if replies.len() != STATS_CMDS {
        return Err(unexpected(format!(
            "expected {STATS_CMDS} replies, got {replies:?}"
        )));
    }
    parse_stats(redis, names, &replies)
}

const STATS_CMDS: usize = 6;

fn add_stats_cmds(pipe: &mut redis::Pipeline, names: &Names) {
    pipe.cmd("XPENDING").arg(&names.stream).arg(&names.group);
    pipe.cmd("XINFO").arg("GROUPS").arg(&names.stream);
    pipe.cmd("XLEN").arg(&names.dead_letters);
    pipe.cmd("SMEMBERS").arg(trimmed_key(&names.dead_letters));
    pipe.cmd("XINFO").arg("STREAM").arg(&names.stream);
    pipe.cmd("HMGET")
        .arg(read_count_key(names))
        .arg("id")
        .arg("read");
}

/// The replies of [`add_stats_cmds`], in order.
fn parse_stats(
    redis: &mut Redis,
    names: &Names,
    replies: &[Value],
) -> Result<QueueStats, RedisError> {
    let (pending, oldest_pending) = parse_pending_summary(&replies[0]);
    let recorded: Vec<String> = match &replies[3] {
        Value::Nil => Vec::new(),
        v => redis::from_redis_value_ref(v)?,
    };
    Ok(QueueStats {
        pending,
        oldest_pending,
        lag: lag(&replies[1], &names.group, &replies[4], &replies[5]),
        dead_letters: match &replies[2] {
            Value::Int(n) => *n as u64,
            _ => 0,
        },
        trimmed_records: count_recorded(redis, &names.dead_letters, recorded, true)?,
    })
}

/// How many `trimmed` records the dead-letter stream holds: the members of
/// [`trimmed_key`] still in it. With `prune`, the others (dropped, or deleted by hand)
/// are removed from the set.
pub fn trimmed_records(
    redis: &mut Redis,
    dead_letters: &str,
    prune: bool,
) -> Result<u64, RedisError> {
    let recorded: Vec<String> =
        redis.query(redis::cmd("SMEMBERS").arg(trimmed_key(dead_letters)))?;
    count_recorded(redis, dead_letters, recorded, prune)
}

fn count_recorded(
    redis: &mut Redis,
    dead_letters: &str,
    recorded: Vec<String>,
    prune: bool,
) -> Result<u64, RedisError> {
    if recorded.is_empty() {
        return Ok(0);
    }
    let mut pipe = redis::pipe();
    for id in &recorded {
        pipe.cmd("XRANGE")
            .arg(dead_letters)
            .arg(id)
            .arg(id)
            .arg("COUNT")
            .arg(1);
    }
    let found: Vec<Value> = redis.query_pipeline(&pipe)?;
    let gone: Vec<&String> = recorded
        .iter()
        .zip(&found)
        .filter(|(_, f)| matches!(f, Value::Array(a) if a.is_empty()))
        .map(|(id, _)| id)
        .collect();
    if prune && !gone.is_empty() {
        let mut srem = redis::cmd("SREM");
        srem.arg(trimmed_key(dead_letters)).arg(&gone);
        redis.query::<u64>(&srem)?;
    }
    Ok((recorded.len() - gone.len()) as u64)
}

/// The group's lag: entries the stream received that the group has not read yet. From
/// [`read_count_key`] when it belongs to the group's position (exact, also after a
/// trimmed gap or an AOF reload); else as XINFO GROUPS says, `None` when Redis cannot
/// tell.
fn lag(groups: &Value, group_name: &str, stream: &Value, mark: &Value) -> Option<u64> {
    let (redis_lag, last) = parse_group(groups, group_name);
    let added = fields_of(stream).and_then(|f| match f.get("entries-added".as_bytes()) {
        Some(Value::Int(n)) => Some(*n as u64),
        _ => None,
    });
    let read = match (mark, &last) {
        (Value::Array(m), Some(last))
            if m.len() == 2 && m[0] == Value::BulkString(last.clone()) =>
        {
            redis::from_redis_value_ref::<u64>(&m[1]).ok()
        }
        (_, Some(last)) if last.as_slice() == b"0-0" => Some(0),
        _ => None,
    };
    match (added, read) {
        (Some(added), Some(read)) => Some(added.saturating_sub(read)),
        _ => redis_lag,
    }
}

/// The group's lag alone (see [`lag`]), read-only: for `paheko-push check`.
pub fn group_lag(redis: &mut Redis, names: &Names) -> Result<Option<u64>, RedisError> {
    let mut pipe = redis::pipe();
    pipe.cmd("XINFO").arg("GROUPS").arg(&names.stream);
    pipe.cmd("XINFO").arg("STREAM").arg(&names.stream);
    pipe.cmd("HMGET")
        .arg(read_count_key(names))
        .arg("id")
        .arg("read");
    let replies: Vec<Value> = redis.query_pipeline(&pipe)?;
    match replies.as_slice() {
        [groups, stream, mark] => Ok(lag(groups, &names.group, stream, mark)),
        other => Err(unexpected(format!("expected 3 replies, got {other:?}"))),
    }
}

/// The lag and last-delivered-id of a group in an XINFO GROUPS reply.
fn parse_group(groups: &Value, group_name: &str) -> (Option<u64>, Option<Vec<u8>>) {
    let Value::Array(groups) = groups else {
        return (None, None);
    };
    for group in groups {
        let Some(fields) = fields_of(group) else {
            continue;
        };
        if matches!(fields.get("name".as_bytes()), Some(Value::BulkString(n)) if n == group_name.as_bytes())
        {
            let lag = match fields.get("lag".as_bytes()) {
                Some(Value::Int(n)) => Some(*n as u64),
                _ => None,
            };
            let last = match fields.get("last-delivered-id".as_bytes()) {
                Some(Value::BulkString(id)) => Some(id.clone()),
                _ => None,
            };
            return (lag, last);
        }
    }
    (None, None)
}

/// The fields of an XINFO reply, RESP2 (a flat array) or RESP3 (a map).
fn fields_of(v: &Value) -> Option<HashMap<&[u8], &Value>> {
    let pairs: Vec<(&Value, &Value)> = match v {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|p| Some((p.first()?, p.get(1)?)))
            .collect(),
        Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
        _ => return None,
    };
    Some(
        pairs
            .into_iter()
            .filter_map(|(k, v)| match k {
                Value::BulkString(k) => Some((k.as_slice(), v)),
                _ => None,
            })
            .collect(),
    )
}

/// Waits before reconnection attempt `n` (0-based): 100 ms doubling to 5 s.
pub fn reconnect_delay(n: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << n.min(6))).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        text.parse().unwrap()
    }

    #[test]
    fn the_redis_version_decides_what_the_worker_does() {
        for (version, support) in [
            ("5.0.14", Support::TooOld),
            ("6.0.16", Support::TooOld),
            ("6.2.0", Support::NoTrimCount),
            ("6.2.14", Support::NoTrimCount),
            ("7.0.0", Support::Full),
            ("7.0.15", Support::Full),
            ("7.2.4", Support::Full),
            ("8.0.2", Support::Full),
            ("10.1", Support::Full),
        ] {
            assert_eq!(Support::of(v(version)), support, "{version}");
        }
        assert_eq!(Support::of(v("7.0.15")).warning(v("7.0.15")), None);
        let six = Support::of(v("6.2.14")).warning(v("6.2.14")).unwrap();
        assert!(six.starts_with("Redis 6.2.14 cannot count"), "{six}");
        let old = Support::of(v("6.0.16")).warning(v("6.0.16")).unwrap();
        assert_eq!(
            old,
            "Redis 6.0.16 is too old: paheko-push needs Redis 6.2 or later (XAUTOCLAIM)"
        );
    }

    #[test]
    fn the_version_is_read_from_info() {
        let info = "# Server\r\nredis_version:7.2.4\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(version_in_info(info), Ok(v("7.2.4")));
        assert_eq!(
            v("6.2.7-rc1"),
            Version {
                major: 6,
                minor: 2,
                patch: 7
            }
        );
        assert!(version_in_info("# Server\r\n").is_err());
        assert!("seven".parse::<Version>().is_err());
        assert!("7".parse::<Version>().is_err());
    }

    #[test]
    fn reconnect_delays_grow_then_cap() {
        let d: Vec<u64> = (0..9)
            .map(|n| reconnect_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(d, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }
}
