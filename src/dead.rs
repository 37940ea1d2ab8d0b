//! The dead-letter tools, `paheko-push dead list|show|replay|drop`: the documented
//! manual procedure for the entries Paheko refused or that could not be read (see
//! docs/dead-letters.md). A dead letter is the original entry's fields followed by the
//! six fields of [`crate::store::DEAD_LETTER_FIELDS`]; the tools strip exactly those
//! last six pairs to recover the original, never look them up by name (an original
//! field may be called `reason`). Every change is all or nothing and checks every ID
//! first: a replay is one server-side script that puts the entries back only if every
//! dead letter is still there, and deletes them in the same step, so a replay run twice
//! (or retried after a lost answer) never puts a ticket back twice; a drop is one
//! MULTI/EXEC under WATCH of the dead-letter stream. A replayed entry carries its first
//! ID in [`IDEMPOTENCY_KEY_FIELD`], which the worker sends as the `Idempotency-Key`.
//! A `trimmed` record (tickets the producer's MAXLEN trimmed before they were read) has
//! no payload: `show` explains it, `replay` refuses it.
//! This module only runs on an operator's command: it never starts the worker, its
//! logger or its health server. Data goes to stdout, messages to stderr.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use std::sync::LazyLock;

use redis::{RedisError, Script, Value};

use crate::Error;
use crate::config::{self, Config};
use crate::event::{Entry, Field, IDEMPOTENCY_KEY_FIELD, StreamId, entries_from};
use crate::logging::Redactor;
use crate::store::{DEAD_LETTER_FIELDS, Redis, trimmed_key};

pub const USAGE: &str = "usage: paheko-push dead list [--json]
       paheko-push dead show ID...
       paheko-push dead replay ID... | --all
       paheko-push dead drop ID...
       paheko-push dead book ID...
`book` (PAHEKO_PUSH_TARGET=paheko-api): puts a held pos.session.closed back, to be
booked as received, the gap written in the entry's notes.
IDs are those of the dead-letter stream (first column of `dead list`).
Exit codes: 0 done, 1 Redis unreachable or failed, 2 usage or configuration error,
3 unknown ID (nothing was changed), 4 not a dead letter paheko-push wrote,
5 a trimmed record, which has nothing to replay (nothing was changed).";

/// An ID that is not in the dead-letter stream; nothing was changed.
pub const EXIT_UNKNOWN_ID: u8 = 3;
/// An entry whose last fields are not the dead-letter fields, so its original fields
/// cannot be told apart; it can be shown and dropped, not replayed.
pub const EXIT_NOT_A_DEAD_LETTER: u8 = 4;
/// A `trimmed` record named to `replay`: it counts lost tickets and holds no payload.
pub const EXIT_NOTHING_TO_REPLAY: u8 = 5;

/// The reason of the record the worker writes for entries trimmed before they were read.
pub const TRIMMED: &str = "trimmed";

/// How long one Redis command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries read per XRANGE when reading the whole stream.
const PAGE: usize = 500;
/// How many times a change is tried again when the dead-letter stream changed between
/// the check and the MULTI/EXEC (the worker dead-lettered something meanwhile).
const TRANSACTION_ATTEMPTS: u32 = 10;
/// Characters of the detail shown in the `dead list` table.
const DETAIL_WIDTH: usize = 60;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    List {
        json: bool,
    },
    Show(Vec<StreamId>),
    Replay(Target),
    Drop(Vec<StreamId>),
    /// Replays held closes marked to be booked as received (API mode).
    Book(Vec<StreamId>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    All,
    Ids(Vec<StreamId>),
}

impl Command {
    /// Parses the arguments after `dead`. The error is for a person, without the usage.
    pub fn parse(args: &[String]) -> Result<Command, String> {
        if args.iter().any(|a| a == "-h" || a == "--help") {
            return Ok(Command::Help);
        }
        let Some((sub, rest)) = args.split_first() else {
            return Err("dead needs a subcommand: list, show, replay or drop".into());
        };
        let (flags, ids): (Vec<&String>, Vec<&String>) =
            rest.iter().partition(|a| a.starts_with('-'));
        let allowed: &[&str] = match sub.as_str() {
            "list" => &["--json"],
            "replay" => &["--all"],
            "show" | "drop" | "book" => &[],
            other => return Err(format!("unknown dead subcommand {other:?}")),
        };
        if let Some(flag) = flags.iter().find(|f| !allowed.contains(&f.as_str())) {
            return Err(format!("dead {sub}: unknown option {flag:?}"));
        }
        let ids = parse_ids(&ids)?;
        match sub.as_str() {
            "list" if !ids.is_empty() => Err("dead list takes no ID (see dead show)".into()),
            "list" => Ok(Command::List {
                json: !flags.is_empty(),
            }),
            "replay" => match (flags.is_empty(), ids.is_empty()) {
                (true, true) => Err("dead replay needs IDs, or --all".into()),
                (false, false) => Err("dead replay takes IDs or --all, not both".into()),
                (true, false) => Ok(Command::Replay(Target::Ids(ids))),
                (false, true) => Ok(Command::Replay(Target::All)),
            },
            _ if ids.is_empty() => Err(format!("dead {sub} needs at least one ID")),
            "show" => Ok(Command::Show(ids)),
            "book" => Ok(Command::Book(ids)),
            _ => Ok(Command::Drop(ids)),
        }
    }
}

/// The IDs in the order given, each once.
fn parse_ids(args: &[&String]) -> Result<Vec<StreamId>, String> {
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    for arg in args {
        let id: StreamId = arg.parse()?;
        if seen.insert(id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// `paheko-push dead …`: parses the arguments, then loads the configuration with
/// `config` (so `dead --help` needs none) and runs the command.
///
/// Every failure is returned for `main` to print and exit with: usage and
/// configuration errors with code 2, the others with [`Failure::code`].
pub fn main(args: &[String], config: impl FnOnce() -> Result<Config, Error>) -> Result<(), Error> {
    let command = Command::parse(args).map_err(|e| Error::Usage(format!("{e}\n{USAGE}")))?;
    if command == Command::Help {
        println!("{USAGE}");
        return Ok(());
    }
    let config = config()?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let result = run(&config, &command, &mut out);
    let _ = out.flush();
    match result {
        Ok(summary) => {
            if let Some(summary) = summary {
                eprintln!("paheko-push: {summary}");
            }
            Ok(())
        }
        // `dead list | head`: the reader has what it wanted.
        Err(Failure::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(failure) => {
            let redactor = Redactor::new(config.secrets());
            Err(Error::Command {
                code: failure.code(),
                message: redactor.redact(&failure.to_string()),
            })
        }
    }
}

/// Why a dead-letter command failed.
#[derive(Debug)]
pub enum Failure {
    /// Redis could not be reached, or the connection broke.
    Unreachable(String),
    /// Redis answered with an error, or with something unexpected.
    Redis(String),
    /// IDs not in the dead-letter stream; the message says which.
    Unknown(String),
    /// An entry that cannot be replayed; the message says which.
    NotADeadLetter(String),
    /// `trimmed` records named to `replay`; the message says which.
    NothingToReplay(String),
    /// The dead-letter stream kept changing under a replay or drop.
    Busy(String),
    /// Writing to stdout failed.
    Output(io::Error),
}

impl Failure {
    /// The exit code: the one policy for the dead-letter commands.
    pub fn code(&self) -> u8 {
        match self {
            Failure::Unknown(_) => EXIT_UNKNOWN_ID,
            Failure::NotADeadLetter(_) => EXIT_NOT_A_DEAD_LETTER,
            Failure::NothingToReplay(_) => EXIT_NOTHING_TO_REPLAY,
            Failure::Unreachable(_) | Failure::Redis(_) | Failure::Busy(_) | Failure::Output(_) => {
                1
            }
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Unreachable(m)
            | Failure::Redis(m)
            | Failure::Unknown(m)
            | Failure::NotADeadLetter(m)
            | Failure::NothingToReplay(m)
            | Failure::Busy(m) => f.write_str(m),
            Failure::Output(e) => write!(f, "cannot write the output: {e}"),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Output(e)
    }
}

/// The dead-letter metadata paheko-push appended to the original fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub original_id: String,
    pub reason: String,
    /// The HTTP status Paheko answered; `None` when it never answered (a bad entry).
    pub status: Option<u16>,
    pub attempts: u32,
    pub dead_at: String,
    pub detail: String,
}

/// One entry of the dead-letter stream.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadEntry {
    pub id: StreamId,
    /// The fields the producer wrote, in order; all the fields when `meta` is `None`.
    pub original: Vec<Field>,
    /// `None` when the entry does not end with the dead-letter fields (it was not
    /// written by paheko-push).
    pub meta: Option<Meta>,
}

impl DeadEntry {
    /// Splits an entry into its original fields and the last six dead-letter fields.
    pub fn from_fields(id: StreamId, mut fields: Vec<Field>) -> DeadEntry {
        let n = DEAD_LETTER_FIELDS.len();
        let names_match = fields.len() >= n
            && fields[fields.len() - n..]
                .iter()
                .zip(DEAD_LETTER_FIELDS)
                .all(|((name, _), expected)| name == expected.as_bytes());
        if !names_match {
            return DeadEntry {
                id,
                original: fields,
                meta: None,
            };
        }
        let tail = fields.split_off(fields.len() - n);
        let text = |i: usize| String::from_utf8_lossy(&tail[i].1).into_owned();
        let status = match text(2).as_str() {
            "" => Some(None),
            s => s.parse().ok().map(Some),
        };
        let meta = match (status, text(3).parse()) {
            (Some(status), Ok(attempts)) => Some(Meta {
                original_id: text(0),
                reason: text(1),
                status,
                attempts,
                dead_at: text(4),
                detail: text(5),
            }),
            _ => None,
        };
        if meta.is_none() {
            fields.extend(tail);
        }
        DeadEntry {
            id,
            original: fields,
            meta,
        }
    }

    /// The original `event` field, when there is one.
    pub fn event(&self) -> Option<String> {
        self.original
            .iter()
            .find(|(name, _)| name == b"event")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// Where the entry goes back in a replay: the producer's order, so that the events
    /// of one cash session keep theirs.
    fn replay_order(&self) -> StreamId {
        self.meta
            .as_ref()
            .and_then(|m| m.original_id.parse().ok())
            .unwrap_or(self.id)
    }

    /// A record of entries trimmed before they were read, not a refused entry.
    pub fn is_trimmed(&self) -> bool {
        self.meta.as_ref().is_some_and(|m| m.reason == TRIMMED)
    }

    /// What a replay writes back: the original fields, plus the ID the entry first had
    /// as [`IDEMPOTENCY_KEY_FIELD`] — unless an earlier replay already added it, so the
    /// key stays that of the producer's entry however often it is replayed.
    pub fn replay_fields(&self) -> Vec<Field> {
        let mut fields = self.original.clone();
        let has_key = fields
            .iter()
            .any(|(name, _)| name == IDEMPOTENCY_KEY_FIELD.as_bytes());
        if let Some(m) = &self.meta
            && !has_key
            && !m.original_id.is_empty()
        {
            fields.push((
                IDEMPOTENCY_KEY_FIELD.as_bytes().to_vec(),
                m.original_id.as_bytes().to_vec(),
            ));
        }
        fields
    }

    /// A `trimmed` record's `count`, `after_id` and `before_id`.
    fn trimmed_fields(&self) -> (String, String, String) {
        let get = |name: &str| {
            self.original
                .iter()
                .find(|(n, _)| n == name.as_bytes())
                .map_or_else(
                    || "?".into(),
                    |(_, v)| String::from_utf8_lossy(v).into_owned(),
                )
        };
        (get("count"), get("after_id"), get("before_id"))
    }
}

/// Puts dead letters back on the stream and deletes them, all or nothing, in one step:
/// only if every one is still in the dead-letter stream (a replay run twice, or retried
/// after its answer was lost, finds them gone and changes nothing) and the stream key
/// is a stream (an XADD refused half-way would leave some back and some not).
/// KEYS: the dead-letter stream, the stream. ARGV: per entry its dead-letter ID, its
/// number of fields, then their names and values. Answers `{1, new IDs}`,
/// `{0, missing IDs}` or `{2, the stream key's type}`.
static REPLAY: LazyLock<Script> = LazyLock::new(|| Script::new(REPLAY_LUA));

const REPLAY_LUA: &str = r#"
local dead, stream = KEYS[1], KEYS[2]
local entries, i = {}, 1
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  local add = {'XADD', stream, '*'}
  for j = i + 2, i + 1 + 2 * n do add[#add + 1] = ARGV[j] end
  entries[#entries + 1] = {id, add}
  i = i + 2 + 2 * n
end
local missing = {}
for _, e in ipairs(entries) do
  if #redis.call('XRANGE', dead, e[1], e[1]) == 0 then missing[#missing + 1] = e[1] end
end
if #missing > 0 then return {0, missing} end
local t = redis.call('TYPE', stream)['ok']
if t ~= 'none' and t ~= 'stream' then return {2, t} end
local ids = {}
for k, e in ipairs(entries) do
  ids[k] = redis.call(unpack(e[2]))
  redis.call('XDEL', dead, e[1])
end
return {1, ids}
"#;

/// What the replay script did.
enum Replayed {
    /// The new IDs on the stream, in the order given.
    Done(Vec<String>),
    /// These dead letters were no longer there: nothing was changed.
    Missing(Vec<StreamId>),
}

/// Runs a parsed command; returns the summary line for stderr.
pub fn run(
    config: &Config,
    command: &Command,
    out: &mut dyn Write,
) -> Result<Option<String>, Failure> {
    let mut redis =
        Redis::open_with_ca(&config.redis_url, config.redis_ca.as_ref(), COMMAND_TIMEOUT)
            .map_err(|e| redis_failure(e, &config.redis_url))?;
    let tools = Tools {
        redis: &mut redis,
        url: &config.redis_url,
        stream: &config.stream,
        dead: &config.dead_letter_stream,
    };
    tools.run(command, out)
}

struct Tools<'a> {
    redis: &'a mut Redis,
    url: &'a str,
    stream: &'a str,
    dead: &'a str,
}

impl Tools<'_> {
    fn run(mut self, command: &Command, out: &mut dyn Write) -> Result<Option<String>, Failure> {
        match command {
            Command::Help => {
                writeln!(out, "{USAGE}")?;
                Ok(None)
            }
            Command::List { json } => {
                let entries = self.read_all()?;
                if *json {
                    writeln!(out, "{}", list_json(&entries))?;
                    return Ok(None);
                }
                if entries.is_empty() {
                    return Ok(Some(format!("no dead letters in {}", self.dead)));
                }
                out.write_all(table(&entries).as_bytes())?;
                Ok(Some(format!(
                    "{} in {}",
                    plural(entries.len(), "dead letter"),
                    self.dead
                )))
            }
            Command::Show(ids) => {
                let entries = self.fetch(ids, false)?;
                for (n, entry) in entries.iter().enumerate() {
                    if n > 0 {
                        writeln!(out)?;
                    }
                    out.write_all(show(entry).as_bytes())?;
                }
                Ok(None)
            }
            Command::Replay(target) => self.replay(target, out),
            Command::Drop(ids) => self.drop(ids, out),
            Command::Book(ids) => self.book(ids, out),
        }
    }

    fn failure(&self, e: RedisError) -> Failure {
        redis_failure(e, self.url)
    }

    /// Every entry of the dead-letter stream, oldest first.
    fn read_all(&mut self) -> Result<Vec<DeadEntry>, Failure> {
        let mut all = Vec::new();
        let mut start = "-".to_string();
        loop {
            let page = self.range(&start, "+", PAGE)?;
            let Some(last) = page.last() else { break };
            start = format!("({}", last.id);
            let full = page.len() == PAGE;
            all.extend(page);
            if !full {
                break;
            }
        }
        Ok(all)
    }

    fn range(&mut self, start: &str, end: &str, count: usize) -> Result<Vec<DeadEntry>, Failure> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.dead)
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(count);
        let reply: Value = self.redis.query(&cmd).map_err(|e| self.failure(e))?;
        let entries = entries_from(reply)
            .map_err(|e| Failure::Redis(format!("XRANGE {}: unexpected reply: {e}", self.dead)))?;
        Ok(entries
            .into_iter()
            .map(|Entry { id, fields }| DeadEntry::from_fields(id, fields.unwrap_or_default()))
            .collect())
    }

    /// The entries with these IDs, in the order given; fails naming every unknown ID.
    fn fetch(&mut self, ids: &[StreamId], changes: bool) -> Result<Vec<DeadEntry>, Failure> {
        let mut found = Vec::new();
        let mut unknown = Vec::new();
        for id in ids {
            let id_text = id.to_string();
            match self.range(&id_text, &id_text, 1)?.pop() {
                Some(entry) => found.push(entry),
                None => unknown.push(*id),
            }
        }
        if unknown.is_empty() {
            return Ok(found);
        }
        Err(self.unknown(&unknown, changes)?)
    }

    /// The message for unknown IDs, with a hint when one is an entry's original ID.
    fn unknown(&mut self, unknown: &[StreamId], changes: bool) -> Result<Failure, Failure> {
        let all = self.read_all()?;
        let listed: Vec<String> = unknown
            .iter()
            .map(|id| {
                let text = id.to_string();
                match all
                    .iter()
                    .find(|e| e.meta.as_ref().is_some_and(|m| m.original_id == text))
                {
                    Some(e) => format!("{text} (the original ID of dead letter {})", e.id),
                    None => text,
                }
            })
            .collect();
        let noun = if unknown.len() == 1 { "ID" } else { "IDs" };
        let mut message = format!(
            "unknown dead-letter {noun} {} in {}",
            listed.join(", "),
            self.dead
        );
        if changes {
            message.push_str("; nothing was changed");
        }
        Ok(Failure::Unknown(message))
    }

    fn replay(&mut self, target: &Target, out: &mut dyn Write) -> Result<Option<String>, Failure> {
        for _ in 0..TRANSACTION_ATTEMPTS {
            let mut entries = match target {
                Target::All => self.read_all()?,
                Target::Ids(ids) => self.fetch(ids, true)?,
            };
            let (trimmed, kept): (Vec<DeadEntry>, Vec<DeadEntry>) =
                entries.drain(..).partition(DeadEntry::is_trimmed);
            let mut entries = kept;
            if !trimmed.is_empty() && matches!(target, Target::Ids(_)) {
                let ids: Vec<String> = trimmed.iter().map(|e| e.id.to_string()).collect();
                return Err(Failure::NothingToReplay(format!(
                    "{} in {} {} of tickets trimmed from {} before paheko-push read them: \
                     there is no payload to replay; nothing was changed (see dead show: enter \
                     those tickets in Paheko by hand, then drop the record)",
                    ids.join(", "),
                    self.dead,
                    if ids.len() == 1 {
                        "is a record"
                    } else {
                        "are records"
                    },
                    self.stream
                )));
            }
            let skipped = (!trimmed.is_empty()).then(|| {
                format!(
                    "; {} left in place: nothing to replay (see dead show)",
                    plural(trimmed.len(), "trimmed record")
                )
            });
            let skipped = skipped.unwrap_or_default();
            if entries.is_empty() {
                return Ok(Some(format!(
                    "no dead letters to replay in {}{skipped}",
                    self.dead
                )));
            }
            let malformed: Vec<String> = entries
                .iter()
                .filter(|e| e.meta.is_none())
                .map(|e| e.id.to_string())
                .collect();
            if !malformed.is_empty() {
                return Err(Failure::NotADeadLetter(format!(
                    "{} in {} do not end with the fields {}, so their original fields are \
                     unknown; nothing was changed (see dead show, then drop them)",
                    malformed.join(", "),
                    self.dead,
                    DEAD_LETTER_FIELDS.join(", ")
                )));
            }
            entries.sort_by_key(DeadEntry::replay_order);
            let new_ids = match self.run_replay(&entries)? {
                Replayed::Done(new_ids) => new_ids,
                // Gone meanwhile (dropped or replayed by someone else).
                Replayed::Missing(missing) => match target {
                    Target::All => continue,
                    Target::Ids(_) => return Err(self.unknown(&missing, true)?),
                },
            };
            for (entry, new_id) in entries.iter().zip(&new_ids) {
                writeln!(out, "{} {new_id}", entry.id)?;
            }
            return Ok(Some(format!(
                "replayed {} onto {} and removed them from {}{skipped}",
                plural(entries.len(), "dead letter"),
                self.stream,
                self.dead
            )));
        }
        Err(self.busy())
    }

    /// Runs [`REPLAY`] for `entries`, in that order.
    fn run_replay(&mut self, entries: &[DeadEntry]) -> Result<Replayed, Failure> {
        let mut call = REPLAY.prepare_invoke();
        call.key(self.dead).key(self.stream);
        for entry in entries {
            let fields = entry.replay_fields();
            call.arg(entry.id.to_string()).arg(fields.len());
            for (name, value) in &fields {
                call.arg(name.as_slice()).arg(value.as_slice());
            }
        }
        let reply: (i64, Vec<String>) = match self.redis.invoke(&call) {
            Ok(reply) => reply,
            // The connection broke around the script: Redis may or may not have run it.
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                return Err(Failure::Unreachable(format!(
                    "the connection to Redis at {} failed during the replay ({e}); it may or \
                     may not have been applied, and a second run cannot replay anything \
                     twice: check with dead list",
                    config::redact_url(self.url)
                )));
            }
            Err(e) => return Err(self.failure(e)),
        };
        match reply {
            (1, new_ids) => Ok(Replayed::Done(new_ids)),
            (0, missing) => Ok(Replayed::Missing(
                missing.iter().filter_map(|id| id.parse().ok()).collect(),
            )),
            (_, kind) => Err(Failure::Redis(format!(
                "{} holds a {}, not a stream; nothing was changed",
                self.stream,
                kind.first().map_or("?", String::as_str)
            ))),
        }
    }

    fn drop(&mut self, ids: &[StreamId], out: &mut dyn Write) -> Result<Option<String>, Failure> {
        let mut announced = false;
        for _ in 0..TRANSACTION_ATTEMPTS {
            self.watch()?;
            let entries = self.fetch(ids, true)?;
            if !announced {
                out.write_all(rows(&entries).as_bytes())?;
                out.flush()?;
                announced = true;
            }
            let mut del = redis::cmd("XDEL");
            del.arg(self.dead);
            let mut forget = redis::cmd("SREM");
            forget.arg(trimmed_key(self.dead));
            for entry in &entries {
                del.arg(entry.id.to_string());
                forget.arg(entry.id.to_string());
            }
            let mut pipe = redis::pipe();
            pipe.atomic().add_command(del);
            if entries.iter().any(DeadEntry::is_trimmed) {
                pipe.add_command(forget);
            }
            if self.exec(&pipe)?.is_none() {
                continue;
            }
            return Ok(Some(format!(
                "dropped {} from {}",
                plural(entries.len(), "dead letter"),
                self.dead
            )));
        }
        Err(self.busy())
    }

    /// Puts held closes back with [`crate::paheko_api::RESOLUTION_FIELD`], through the
    /// same all-or-nothing script as a replay.
    fn book(&mut self, ids: &[StreamId], out: &mut dyn Write) -> Result<Option<String>, Failure> {
        use crate::paheko_api::{BOOK_AS_RECEIVED, RESOLUTION_FIELD};
        let mut entries = self.fetch(ids, true)?;
        let wrong: Vec<String> = entries
            .iter()
            .filter(|e| e.meta.is_none() || e.event().as_deref() != Some("pos.session.closed"))
            .map(|e| e.id.to_string())
            .collect();
        if !wrong.is_empty() {
            return Err(Failure::NotADeadLetter(format!(
                "{} in {} {} not a held pos.session.closed; only a session can be booked as \
                 received (see dead show; replay or drop the others); nothing was changed",
                wrong.join(", "),
                self.dead,
                if wrong.len() == 1 { "is" } else { "are" }
            )));
        }
        for entry in &mut entries {
            entry
                .original
                .retain(|(n, _)| n != RESOLUTION_FIELD.as_bytes());
            entry.original.push((
                RESOLUTION_FIELD.as_bytes().to_vec(),
                BOOK_AS_RECEIVED.as_bytes().to_vec(),
            ));
        }
        entries.sort_by_key(DeadEntry::replay_order);
        match self.run_replay(&entries)? {
            Replayed::Done(new_ids) => {
                for (entry, new_id) in entries.iter().zip(&new_ids) {
                    writeln!(out, "{} {new_id}", entry.id)?;
                }
                Ok(Some(format!(
                    "put {} back onto {} to be booked as received, and removed them from {}",
                    plural(entries.len(), "held session"),
                    self.stream,
                    self.dead
                )))
            }
            Replayed::Missing(missing) => Err(self.unknown(&missing, true)?),
        }
    }

    fn busy(&self) -> Failure {
        Failure::Busy(format!(
            "{} kept changing while this ran ({TRANSACTION_ATTEMPTS} tries); nothing was \
             changed, try again",
            self.dead
        ))
    }

    fn watch(&mut self) -> Result<(), Failure> {
        let mut cmd = redis::cmd("WATCH");
        cmd.arg(self.dead);
        self.redis.query::<()>(&cmd).map_err(|e| self.failure(e))
    }

    /// MULTI/EXEC; `None` when a watched key changed and nothing was done.
    fn exec(&mut self, pipe: &redis::Pipeline) -> Result<Option<Vec<Value>>, Failure> {
        match self.redis.query_pipeline::<Value>(pipe) {
            Ok(Value::Nil) => Ok(None),
            Ok(Value::Array(results)) => Ok(Some(results)),
            Ok(other) => Err(Failure::Redis(format!("EXEC answered {other:?}"))),
            // The connection broke around EXEC: Redis may or may not have run it.
            Err(e) if !e.is_io_error() && !e.is_timeout() && !e.is_connection_dropped() => {
                Err(self.failure(e))
            }
            Err(e) => Err(Failure::Unreachable(format!(
                "the connection to Redis at {} failed during the change ({e}); it may or \
                 may not have been applied: check with dead list",
                config::redact_url(self.url)
            ))),
        }
    }
}

fn redis_failure(e: RedisError, url: &str) -> Failure {
    let url = config::redact_url(url);
    if e.is_connection_refusal() || e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        Failure::Unreachable(format!("cannot reach Redis at {url}: {e}"))
    } else {
        Failure::Redis(format!("Redis at {url} answered: {e}"))
    }
}

fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A value on one line of a table: lossy UTF-8, control characters as spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width - 1).collect();
    cut.push('…');
    cut
}

const HEADER: [&str; 8] = [
    "ID",
    "ORIGINAL ID",
    "EVENT",
    "REASON",
    "STATUS",
    "ATTEMPTS",
    "DEAD AT",
    "DETAIL",
];

fn cells(entry: &DeadEntry) -> [String; 8] {
    let event = entry
        .event()
        .map(|e| one_line(&e))
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "-".into());
    match &entry.meta {
        Some(m) => [
            entry.id.to_string(),
            if m.original_id.is_empty() {
                "-".into()
            } else {
                one_line(&m.original_id)
            },
            event,
            one_line(&m.reason),
            m.status.map_or_else(|| "-".into(), |s| s.to_string()),
            m.attempts.to_string(),
            one_line(&m.dead_at),
            truncate(&one_line(&m.detail), DETAIL_WIDTH),
        ],
        None => [
            entry.id.to_string(),
            "?".into(),
            event,
            "?".into(),
            "?".into(),
            "?".into(),
            "?".into(),
            "not a dead letter written by paheko-push".into(),
        ],
    }
}

/// The rows of `entries` (no header), columns aligned.
fn rows(entries: &[DeadEntry]) -> String {
    aligned(entries.iter().map(cells).collect())
}

/// The `dead list` table: a header, then one line per entry.
fn table(entries: &[DeadEntry]) -> String {
    let mut lines = vec![HEADER.map(String::from)];
    lines.extend(entries.iter().map(cells));
    aligned(lines)
}

fn aligned(lines: Vec<[String; 8]>) -> String {
    let mut widths = [0; 8];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for line in &lines {
        let mut row = String::new();
        for (i, cell) in line.iter().enumerate() {
            if i > 0 {
                row.push_str("  ");
            }
            row.push_str(cell);
            let pad = widths[i] - cell.chars().count();
            row.extend(std::iter::repeat_n(' ', pad));
        }
        text.push_str(row.trim_end());
        text.push('\n');
    }
    text
}

/// `dead list --json`: one JSON array of objects, oldest first. Text is lossy UTF-8;
/// the metadata is `null` for an entry paheko-push did not write.
fn list_json(entries: &[DeadEntry]) -> String {
    let items: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let m = e.meta.as_ref();
            serde_json::json!({
                "id": e.id.to_string(),
                "original_id": m.map(|m| &m.original_id),
                "event": e.event(),
                "reason": m.map(|m| &m.reason),
                "status": m.and_then(|m| m.status),
                "attempts": m.map(|m| m.attempts),
                "dead_at": m.map(|m| &m.dead_at),
                "detail": m.map(|m| &m.detail),
            })
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

/// `dead show`: the metadata, then the original fields, JSON payloads pretty-printed.
fn show(entry: &DeadEntry) -> String {
    let mut text = String::new();
    let mut line = |name: &str, value: &str| {
        text.push_str(&format!("{name:<12} {value}\n"));
    };
    line("dead letter", &entry.id.to_string());
    match &entry.meta {
        Some(m) if entry.is_trimmed() => {
            let (count, after, before) = entry.trimmed_fields();
            let entries = if count == "1" { "entry" } else { "entries" };
            line("reason", &m.reason);
            line("lost", &format!("{count} {entries}"));
            line("after", &id_and_time(&after));
            line("before", &id_and_time(&before));
            line("dead at", &m.dead_at);
            line("detail", &one_line(&m.detail));
            text.push_str(&format!(
                "\nThe producer's MAXLEN trimmed {count} {entries} from the stream before \
                 paheko-push delivered them,\nwhile Paheko was unreachable or the worker stopped: \
                 their tickets never reached Paheko\nand their content is gone, so there is \
                 nothing to replay. They were written after\n{after} and before {before} \
                 (both excluded; an ID starts with its time in ms).\nFind those tickets in \
                 RecyClique, enter them in Paheko by hand, then drop this record.\n"
            ));
            return text;
        }
        Some(m) => {
            line("original ID", &m.original_id);
            line("reason", &m.reason);
            line(
                "status",
                &m.status.map_or_else(|| "-".into(), |s| s.to_string()),
            );
            line("attempts", &m.attempts.to_string());
            line("dead at", &m.dead_at);
            line("detail", &one_line(&m.detail));
        }
        None => line(
            "note",
            &format!(
                "not a dead letter written by paheko-push (it does not end with {})",
                DEAD_LETTER_FIELDS.join(", ")
            ),
        ),
    }
    text.push_str(&format!("\noriginal fields ({}):\n", entry.original.len()));
    for (name, value) in &entry.original {
        let name = String::from_utf8_lossy(name);
        let value = String::from_utf8_lossy(value);
        let is_body = name == "payload" || name == "data";
        let block = |text: &mut String, heading: String, body: &str| {
            text.push_str(&format!("  {heading}:\n"));
            for l in body.lines() {
                text.push_str(&format!("    {l}\n"));
            }
        };
        if is_body {
            match pretty_json(&value) {
                Ok(pretty) => block(&mut text, name.into_owned(), &pretty),
                Err(e) => block(&mut text, format!("{name} (not valid JSON: {e})"), &value),
            }
        } else if value.contains('\n') {
            block(&mut text, name.into_owned(), &value);
        } else {
            text.push_str(&format!("  {name}: {value}\n"));
        }
    }
    text
}

/// A stream ID followed by the time it carries, for a person.
fn id_and_time(id: &str) -> String {
    match id.parse::<StreamId>() {
        Ok(StreamId { ms: 0, .. }) => format!("{id} (the stream's beginning)"),
        Ok(parsed) => {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(parsed.ms);
            format!("{id} ({})", crate::clock::rfc3339(at))
        }
        Err(_) => id.to_string(),
    }
}

/// Indents valid JSON two spaces a level, keeping the keys in their order and every
/// number and string exactly as written (a tree of `serde_json::Value` would sort the
/// keys and could reformat numbers).
pub fn pretty_json(raw: &str) -> Result<String, serde_json::Error> {
    serde_json::from_str::<serde::de::IgnoredAny>(raw)?;
    let mut out = String::with_capacity(raw.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = raw.trim().chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}' | ']')) {
                    out.extend(chars.next());
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    fn id(text: &str) -> StreamId {
        text.parse().unwrap()
    }

    fn fields(pairs: &[(&str, &str)]) -> Vec<Field> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn parses_the_subcommands() {
        let p = |a: &str| Command::parse(&args(a));
        assert_eq!(p("list"), Ok(Command::List { json: false }));
        assert_eq!(p("list --json"), Ok(Command::List { json: true }));
        assert_eq!(p("show 1-1"), Ok(Command::Show(vec![id("1-1")])));
        assert_eq!(
            p("replay 2-0 1-1 2-0"),
            Ok(Command::Replay(Target::Ids(vec![id("2-0"), id("1-1")])))
        );
        assert_eq!(p("replay --all"), Ok(Command::Replay(Target::All)));
        assert_eq!(p("drop 5"), Ok(Command::Drop(vec![id("5-0")])));
        assert_eq!(p("drop 1-1 --help"), Ok(Command::Help));
        assert_eq!(p("book 3-1"), Ok(Command::Book(vec![id("3-1")])));
        assert!(p("book").is_err() && p("book --all").is_err());
    }

    #[test]
    fn usage_errors_say_what_is_wrong() {
        for (line, says) in [
            ("", "needs a subcommand"),
            ("purge", "unknown dead subcommand \"purge\""),
            ("list --yaml", "unknown option \"--yaml\""),
            ("list 1-1", "takes no ID"),
            ("show", "needs at least one ID"),
            ("drop", "needs at least one ID"),
            ("drop --all", "unknown option \"--all\""),
            ("replay", "needs IDs, or --all"),
            ("replay --all 1-1", "not both"),
            ("show x-1", "not a stream entry ID"),
        ] {
            let e = Command::parse(&args(line)).unwrap_err();
            assert!(e.contains(says), "{line:?}: {e}");
        }
    }

    #[test]
    fn strips_exactly_the_last_six_fields() {
        let mut all = fields(&[
            ("event", "pos.ticket.created"),
            ("payload", "{}"),
            ("reason", "written by the producer"),
        ]);
        let original = all.clone();
        all.extend(fields(&[
            ("original_id", "1-1"),
            ("reason", "rejected"),
            ("status", "422"),
            ("attempts", "1"),
            ("dead_at", "2026-01-01T00:00:00.000Z"),
            ("detail", "HTTP 422"),
        ]));
        let e = DeadEntry::from_fields(id("9-0"), all);
        assert_eq!(e.original, original);
        let m = e.meta.unwrap();
        assert_eq!(
            (m.reason.as_str(), m.status, m.attempts),
            ("rejected", Some(422), 1)
        );

        let bad_payload = fields(&[
            ("payload", "{not json"),
            ("original_id", "1-2"),
            ("reason", "invalid_payload"),
            ("status", ""),
            ("attempts", "0"),
            ("dead_at", "t"),
            ("detail", "d"),
        ]);
        let e = DeadEntry::from_fields(id("9-1"), bad_payload);
        assert_eq!(e.original, fields(&[("payload", "{not json")]));
        assert_eq!(e.meta.unwrap().status, None);
    }

    #[test]
    fn an_entry_paheko_push_did_not_write_keeps_all_its_fields() {
        let f = fields(&[("event", "x"), ("reason", "r")]);
        let e = DeadEntry::from_fields(id("1-0"), f.clone());
        assert_eq!((e.original, e.meta), (f, None));
    }

    #[test]
    fn pretty_json_keeps_order_and_numbers() {
        let raw = r#"{"z":1.50,"a":[1, {"k":"v,\"x\":{"}],"e":{},"l":[ ]}"#;
        assert_eq!(
            pretty_json(raw).unwrap(),
            "{\n  \"z\": 1.50,\n  \"a\": [\n    1,\n    {\n      \"k\": \"v,\\\"x\\\":{\"\n    }\n  ],\n  \"e\": {},\n  \"l\": []\n}"
        );
        assert_eq!(pretty_json("42").unwrap(), "42");
        assert!(pretty_json("{not json").is_err());
    }

    #[test]
    fn table_columns_line_up() {
        let mut f = fields(&[("event", "pos.ticket.created"), ("payload", "{}")]);
        f.extend(fields(&[
            ("original_id", "1-1"),
            ("reason", "rejected"),
            ("status", "422"),
            ("attempts", "3"),
            ("dead_at", "2026-01-01T00:00:00.000Z"),
            ("detail", "line one\nline two"),
        ]));
        let t = table(&[DeadEntry::from_fields(id("10-0"), f)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            [
                "ID    ORIGINAL ID  EVENT               REASON    STATUS  ATTEMPTS  DEAD AT                   DETAIL",
                "10-0  1-1          pos.ticket.created  rejected  422     3         2026-01-01T00:00:00.000Z  line one line two",
            ]
        );
    }
}
