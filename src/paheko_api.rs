//! Direct booking through Paheko's own REST API, no plugin (`PAHEKO_PUSH_TARGET=
//! paheko-api`, issue 16 §2, docs/paheko-api.md). A pusher in this mode hands each
//! event to [`Client::deliver`], which does one attempt's I/O and answers the same
//! [`Reply`] a plugin's answer would be, so the acker decides as it always does:
//! - `pos.session.opened` is recorded in the session's hash in Redis;
//! - `pos.ticket.created` is folded into its session's running totals by one Lua
//!   script, idempotent per idempotency key (a repeat changes nothing and answers
//!   success), refused as `after_close` once the session is booked;
//! - `pos.session.closed` is reconciled and turned into one entry by
//!   [`crate::booking`]; before any POST the entry's reference is looked up through
//!   `/api/sql`, because Paheko does not de-duplicate: whatever was lost (a timeout, a
//!   crash between Paheko's answer and the acknowledgement, a replay), a session is
//!   booked once.
//!
//! A hold answers [`HELD_STATUS`] with `{"status":"held","code":…}`, which the acker
//! dead-letters; Paheko's own 401/403/404 pass through (a refusal of every event), its
//! 5xx and HTML pages (`database is locked`) through as transient. Redis keys, beside
//! the stream's: `<stream>:<group>:paheko:session:<id>` (hash), `…:folded` and `…:after_close`
//! (sets of idempotency keys). This module decides nothing about retries and never
//! sleeps.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use redis::Script;
use serde_json::{Value, json};

use crate::booking::{self, Code, Hold, Plan, Totals};
use crate::check::{Line, Status};
use crate::config::{CaFile, Config, PahekoApi, Target};
use crate::event::Event;
use crate::pusher::Reply;
use crate::store::Redis;

/// The status a hold is reported with: a per-event refusal the acker dead-letters
/// (it must be in `PAHEKO_PUSH_DEAD_LETTER_STATUSES`; the configuration checks it).
pub const HELD_STATUS: u16 = 422;

/// The field `paheko-push dead book` adds to a held close it puts back: book the
/// session as received, the gap written in the entry's notes.
pub const RESOLUTION_FIELD: &str = "paheko_push_resolution";
pub const BOOK_AS_RECEIVED: &str = "book_as_received";

/// How much of Paheko's answer is kept for a log line or a dead letter.
const DETAIL_LIMIT: usize = 1024;

/// The session's hash: what the opened event said, the running totals (`sales`,
/// `items`, `tickets`, `m:<method>`), and once booked `booked` (the entry's id, or
/// `none`), `booked_at`, `reference`.
/// Named after the stream and the group, like the lease (`<stream>:<group>:active`):
/// each group books its own sessions.
pub fn session_key(prefix: &str, session: &str) -> String {
    format!("{prefix}:paheko:session:{session}")
}

/// Folds a ticket into its session, once per idempotency key.
/// KEYS: the session hash, its folded set, its after-close set. ARGV: the key, the
/// total, the item lines, then method/amount pairs. Answers `folded`, `repeat` (already
/// folded: nothing changed) or `after_close` (the session is booked: not folded).
static FOLD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 'repeat' end
if redis.call('HEXISTS', KEYS[1], 'booked') == 1 then
  redis.call('SADD', KEYS[3], ARGV[1])
  return 'after_close'
end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'sales', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'items', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'tickets', 1)
for i = 4, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], 'm:' .. ARGV[i], ARGV[i + 1])
end
return 'folded'
"#,
    )
});

/// One pusher's way to Paheko's API and to the session totals in Redis. Shared by the
/// pushers: the agent pools HTTP connections, [`Client::redis`] Redis ones.
pub struct Client {
    agent: ureq::Agent,
    api: Arc<PahekoApi>,
    /// `<stream>:<group>`, the prefix of the session keys.
    prefix: String,
    authorization: String,
    redis_url: String,
    redis_ca: Option<CaFile>,
    idle: Mutex<Vec<Redis>>,
    /// `PAHEKO_PUSH_TIMEOUT_SECONDS`, for a whole attempt (lookup and POST together),
    /// so an attempt lasts no longer than a plugin request: a new lease holder waits
    /// out that long before it takes over (docs/paheko-api.md).
    timeout: Duration,
}

/// Why an API call got no usable answer: for the [`Reply`].
enum Failed {
    /// Paheko answered this (not 2xx, or a 2xx the worker cannot read).
    Status {
        status: u16,
        retry_after: Option<String>,
        body: String,
    },
    NoAnswer(String),
}

impl From<Failed> for Reply {
    fn from(f: Failed) -> Reply {
        match f {
            Failed::Status {
                status,
                retry_after,
                body,
            } => Reply::Status {
                status,
                retry_after,
                body,
            },
            Failed::NoAnswer(why) => Reply::NoAnswer(why),
        }
    }
}

fn ok(body: Value) -> Reply {
    Reply::Status {
        status: 200,
        retry_after: None,
        body: body.to_string(),
    }
}

fn held(hold: &Hold) -> Reply {
    Reply::Status {
        status: HELD_STATUS,
        retry_after: None,
        body: hold.to_json(),
    }
}

fn redis_failed(e: redis::RedisError) -> Reply {
    Reply::NoAnswer(format!("redis: {e}"))
}

impl Client {
    /// The client for `config` when it targets Paheko's API.
    pub fn for_config(agent: &ureq::Agent, config: &Config) -> Option<Client> {
        let Target::PahekoApi(api) = &config.target else {
            return None;
        };
        Some(Client::new(agent.clone(), config, Arc::clone(api)))
    }

    pub fn new(agent: ureq::Agent, config: &Config, api: Arc<PahekoApi>) -> Client {
        Client {
            agent,
            authorization: basic(&api.user, &api.password),
            api,
            prefix: format!("{}:{}", config.stream, config.group),
            redis_url: config.redis_url.clone(),
            redis_ca: config.redis_ca.clone(),
            idle: Mutex::new(Vec::new()),
            timeout: config.timeout,
        }
    }

    /// One attempt at `event`, answered as a plugin would.
    pub fn deliver(&self, event: &Event) -> Reply {
        let deadline = Instant::now() + self.timeout;
        let mut redis = match self.redis() {
            Ok(r) => r,
            Err(e) => return redis_failed(e),
        };
        // The entry's `event` field, else the payload's own (tickets carry one).
        let kind = match event.kind.as_str() {
            "" => serde_json::from_slice::<Value>(event.body())
                .ok()
                .and_then(|v| v["event"].as_str().map(str::to_string))
                .unwrap_or_default(),
            kind => kind.to_string(),
        };
        let reply = match kind.as_str() {
            "pos.session.opened" => self.opened(&mut redis, event),
            "pos.ticket.created" => self.ticket(&mut redis, event),
            "pos.session.closed" => self.closed(&mut redis, event, deadline),
            other => held(&Hold::new(
                Code::InvalidPayload,
                json!({ "message": format!(
                    "event type {other:?} has no meaning for booking through Paheko's API"
                ) }),
            )),
        };
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(redis);
        }
        reply
    }

    /// A Redis connection of the pool, or a new one (connected on first use).
    fn redis(&self) -> Result<Redis, redis::RedisError> {
        if let Some(r) = self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            return Ok(r);
        }
        Redis::open_with_ca(
            &self.redis_url,
            self.redis_ca.as_ref(),
            crate::store::CONNECT_TIMEOUT,
        )
    }

    fn opened(&self, redis: &mut Redis, event: &Event) -> Reply {
        let o = match serde_json::from_slice::<Value>(event.body()) {
            Ok(Value::Object(o)) => o,
            _ => {
                return held(&Hold::new(
                    Code::InvalidPayload,
                    json!({ "message": "the payload is not a JSON object" }),
                ));
            }
        };
        let Some(session) = scalar(o.get("session_id")) else {
            return held(&Hold::new(
                Code::InvalidPayload,
                json!({ "message": "session_id is missing" }),
            ));
        };
        let mut cmd = redis::cmd("HSET");
        cmd.arg(session_key(&self.prefix, &session))
            .arg("opened")
            .arg(1);
        for name in ["register_id", "site_id", "operator_id", "opened_at"] {
            if let Some(v) = scalar(o.get(name)) {
                cmd.arg(name).arg(v);
            }
        }
        match redis.query::<()>(&cmd) {
            Ok(()) => ok(json!({ "status": "recorded", "session_id": session })),
            Err(e) => redis_failed(e),
        }
    }

    fn ticket(&self, redis: &mut Redis, event: &Event) -> Reply {
        let ticket = match booking::parse_ticket(event.body()) {
            Ok(t) => t,
            Err(hold) => return held(&hold),
        };
        let key = session_key(&self.prefix, &ticket.session_id);
        let mut call = FOLD.prepare_invoke();
        call.key(&key)
            .key(format!("{key}:folded"))
            .key(format!("{key}:after_close"))
            .arg(&event.idempotency_key)
            .arg(ticket.total)
            .arg(ticket.items);
        for (method, amount) in &ticket.payments {
            call.arg(method).arg(*amount);
        }
        match redis.invoke::<String>(&call) {
            Ok(outcome) if outcome == "after_close" => held(&Hold::new(
                Code::AfterClose,
                json!({
                    "session_id": ticket.session_id,
                    "total_amount": ticket.total,
                    "message": "the session is already booked in Paheko; this ticket is not in its entry: enter it by hand, then drop this dead letter",
                }),
            )),
            Ok(outcome) => ok(json!({ "status": outcome, "session_id": ticket.session_id })),
            Err(e) => redis_failed(e),
        }
    }

    fn closed(&self, redis: &mut Redis, event: &Event, deadline: Instant) -> Reply {
        let close = match booking::parse_close(event.body()) {
            Ok(c) => c,
            Err(hold) => return held(&hold),
        };
        if close.session_id.bytes().any(|b| b < 0x20) {
            return held(&Hold::new(
                Code::InvalidPayload,
                json!({ "message": "session_id holds a control character" }),
            ));
        }
        let key = session_key(&self.prefix, &close.session_id);
        let session: BTreeMap<String, String> = match redis.query(redis::cmd("HGETALL").arg(&key)) {
            Ok(s) => s,
            Err(e) => return redis_failed(e),
        };
        if let Some(id) = session.get("booked") {
            return ok(json!({ "status": "booked", "transaction": id, "repeat": true }));
        }
        let totals = totals_of(&session);
        let as_received = event
            .fields
            .iter()
            .any(|(n, v)| n == RESOLUTION_FIELD.as_bytes() && v == BOOK_AS_RECEIVED.as_bytes());
        let plan = booking::plan(
            &close,
            &totals,
            session.get("register_id").map(String::as_str),
            &self.api.accounts,
            &self.api.zone,
            as_received,
        );
        let entry = match plan {
            Err(hold) => {
                log::warn!(correlation_id = event.id.to_string().as_str(), session_id = close.session_id.as_str(),
                    code = hold.code.as_str(), detail = hold.to_json().as_str();
                    "session held, nothing booked: resolve it with paheko-push dead book (as received) or dead drop");
                return held(&hold);
            }
            Ok(Plan::Nothing) => {
                log::info!(session_id = close.session_id.as_str(), tickets = totals.tickets;
                    "session closed with no sale and no cash difference: nothing to book");
                return match mark_booked(redis, &key, "none", "", "") {
                    Ok(()) => ok(json!({ "status": "nothing_to_book" })),
                    Err(e) => redis_failed(e),
                };
            }
            Ok(Plan::Book(entry)) => entry,
        };
        // Paheko does not de-duplicate: an earlier attempt may have booked it already.
        let id = match self.lookup(&entry.reference, deadline) {
            Ok(Some(id)) => {
                log::info!(session_id = close.session_id.as_str(), reference = entry.reference.as_str(), transaction = id;
                    "already in Paheko (an earlier attempt booked it): not booked again");
                id
            }
            Ok(None) => match self.book(&entry, deadline) {
                Ok(id) => {
                    log::info!(session_id = close.session_id.as_str(), reference = entry.reference.as_str(),
                        transaction = id, date = entry.date.to_string().as_str(), lines = entry.lines.len(),
                        as_received = as_received;
                        "session booked in Paheko");
                    id
                }
                Err(BookFailed::Held(hold)) => {
                    log::warn!(correlation_id = event.id.to_string().as_str(), session_id = close.session_id.as_str(),
                        code = hold.code.as_str(), detail = hold.to_json().as_str();
                        "Paheko refused the session's entry: held, nothing booked");
                    return held(&hold);
                }
                Err(BookFailed::Other(f)) => return f.into(),
            },
            Err(f) => return f.into(),
        };
        match mark_booked(
            redis,
            &key,
            &id.to_string(),
            &entry.reference,
            &entry.date.to_string(),
        ) {
            Ok(()) => ok(json!({ "status": "booked", "transaction": id })),
            // Booked in Paheko; the next attempt finds it by its reference.
            Err(e) => redis_failed(e),
        }
    }

    /// The id of the entry with this reference, if Paheko has one.
    fn lookup(&self, reference: &str, deadline: Instant) -> Result<Option<i64>, Failed> {
        let sql = format!(
            "SELECT id FROM acc_transactions WHERE reference = {} ORDER BY id LIMIT 2",
            quote(reference)
        );
        let found = self.sql(&sql, deadline)?;
        let ids: Vec<i64> = found.iter().filter_map(|r| r["id"].as_i64()).collect();
        if ids.len() > 1 {
            log::warn!(reference = reference, transactions = format!("{ids:?}").as_str();
                "Paheko holds more than one entry with this reference (made outside paheko-push?): the first one is taken as the session's");
        }
        Ok(ids.first().copied())
    }

    /// Rows of a read-only `SELECT` through `/api/sql`.
    fn sql(&self, sql: &str, deadline: Instant) -> Result<Vec<Value>, Failed> {
        let (status, retry_after, body) =
            self.call("/api/sql", "text/plain", sql.as_bytes(), deadline)?;
        let parsed: Option<Value> = serde_json::from_str(&body).ok();
        match (status, parsed) {
            (200..=299, Some(v)) if v["results"].is_array() => {
                Ok(v["results"].as_array().cloned().unwrap_or_default())
            }
            (200..=299, _) => Err(Failed::Status {
                // A 2xx the worker cannot read is not an answer: try again.
                status: 502,
                retry_after: None,
                body: format!(
                    "/api/sql answered {status} without results: {}",
                    reduce(&body)
                ),
            }),
            _ => Err(Failed::Status {
                status,
                retry_after,
                body: reduce(&body),
            }),
        }
    }

    fn book(&self, entry: &booking::Entry, deadline: Instant) -> Result<i64, BookFailed> {
        let body = entry.api_body().to_string();
        let (status, retry_after, answer) = self
            .call(
                "/api/accounting/transaction",
                "application/json",
                body.as_bytes(),
                deadline,
            )
            .map_err(BookFailed::Other)?;
        let parsed: Option<Value> = serde_json::from_str(&answer).ok();
        match (status, parsed) {
            (200..=299, Some(v)) if v["id"].is_i64() => Ok(v["id"].as_i64().unwrap_or(0)),
            // Booked, perhaps: the next attempt looks it up before anything else.
            (200..=299, _) => Err(BookFailed::Other(Failed::Status {
                status: 502,
                retry_after: None,
                body: format!(
                    "Paheko answered {status} without the entry's id: {}",
                    reduce(&answer)
                ),
            })),
            (400, Some(v)) => {
                let message = v["error"].as_str().unwrap_or("").to_string();
                Err(BookFailed::Held(classify_refusal(entry, &message)))
            }
            _ => Err(BookFailed::Other(Failed::Status {
                status,
                retry_after,
                body: reduce(&answer),
            })),
        }
    }

    /// POSTs `body` to `path` if the attempt's time is not over; the answer's status,
    /// `Retry-After` and body.
    fn call(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
        deadline: Instant,
    ) -> Result<(u16, Option<String>, String), Failed> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(1) {
            return Err(Failed::NoAnswer(format!(
                "timeout: PAHEKO_PUSH_TIMEOUT_SECONDS ran out for this attempt before {path} was sent"
            )));
        }
        let response = self
            .agent
            .post(format!("{}{path}", self.api.url))
            .config()
            .timeout_global(Some(left))
            .build()
            .header("Authorization", &self.authorization)
            .header("Content-Type", content_type)
            .header("Accept", "application/json")
            .send(body);
        let mut response = match response {
            Ok(r) => r,
            Err(e) => return Err(Failed::NoAnswer(crate::pusher::describe(&e))),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = response
            .body_mut()
            .with_config()
            .limit(8 * 1024 * 1024)
            .read_to_vec()
            .map_err(|e| Failed::NoAnswer(format!("reading Paheko's answer: {e}")))?;
        let text = String::from_utf8_lossy(&bytes).replace(&self.api.password, "[redacted]");
        Ok((status, retry_after, text))
    }
}

enum BookFailed {
    Held(Hold),
    Other(Failed),
}

/// What Paheko's 400 to an entry means (its messages, 1.3.22.1): no open year for the
/// date, an account missing from the chart, or another refusal — all held with the
/// message, never retried as they are.
pub fn classify_refusal(entry: &booking::Entry, message: &str) -> Hold {
    let code = if message.contains("valid open year") {
        Code::NoOpenYear
    } else if message.contains("Le compte avec le code") || message.contains("n'existe pas") {
        Code::UnknownAccount
    } else {
        Code::RefusedByPaheko
    };
    Hold::new(
        code,
        json!({
            "reference": entry.reference,
            "date": entry.date.to_string(),
            "paheko": message,
        }),
    )
}

fn mark_booked(
    redis: &mut Redis,
    key: &str,
    id: &str,
    reference: &str,
    date: &str,
) -> Result<(), redis::RedisError> {
    redis.query(
        redis::cmd("HSET")
            .arg(key)
            .arg("booked")
            .arg(id)
            .arg("booked_at")
            .arg(crate::clock::unix_now())
            .arg("reference")
            .arg(reference)
            .arg("date")
            .arg(date),
    )
}

/// The running totals of a session's hash.
pub fn totals_of(session: &BTreeMap<String, String>) -> Totals {
    let num = |name: &str| {
        session
            .get(name)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    Totals {
        tickets: num("tickets").max(0) as u64,
        items: num("items").max(0) as u64,
        sales: num("sales"),
        methods: session
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("m:")?.to_string(), v.parse().ok()?)))
            .collect(),
    }
}

/// An SQL string literal: Paheko's `/api/sql` takes no bound parameters.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn scalar(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An answer short enough for a log line: an HTML page (Paheko's crash pages, such as
/// `database is locked`) reduced to its title, anything else to its first bytes.
pub fn reduce(body: &str) -> String {
    let lower = body.to_ascii_lowercase();
    if let (Some(start), Some(end)) = (lower.find("<title>"), lower.find("</title>"))
        && start + 7 <= end
    {
        let title = body[start + 7..end].trim();
        let mut out = format!("HTML page: {title}");
        // Paheko's error page names the exception in its body: keep the known one.
        if lower.contains("database is locked") && !title.contains("database is locked") {
            out.push_str(" (database is locked)");
        }
        return out;
    }
    let mut end = body.len().min(DETAIL_LIMIT);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    body[..end].trim().to_string()
}

/// `paheko-push check` in API mode: the credentials, that an open year covers today,
/// that every account the rule books on exists in that year's chart. No line in plugin
/// mode.
pub fn check(config: &Config) -> Vec<Line> {
    let Target::PahekoApi(api) = &config.target else {
        return Vec::new();
    };
    let line = |status, what, detail: String| Line {
        status,
        what,
        detail,
    };
    let agent = crate::pusher::Pusher::agent(
        config.timeout,
        !config.allow_http,
        config.plugin_ca.as_ref(),
    );
    let client = Client::new(agent.clone(), config, Arc::clone(api));
    let years = agent
        .get(format!("{}/api/accounting/years", api.url))
        .header("Authorization", &client.authorization)
        .call();
    let skip = |why: &str| {
        vec![
            line(Status::Skip, "open year", why.to_string()),
            line(Status::Skip, "accounts", why.to_string()),
        ]
    };
    let years: Vec<Value> = match years {
        Err(e) => {
            let mut lines = vec![line(
                Status::Fail,
                "paheko api",
                format!("{}: {}", api.url, crate::pusher::describe(&e)),
            )];
            lines.extend(skip("Paheko unreachable"));
            return lines;
        }
        Ok(mut r) => {
            let status = r.status().as_u16();
            let body = r.body_mut().read_to_string().unwrap_or_default();
            match (status, serde_json::from_str::<Value>(&body)) {
                (200, Ok(Value::Array(years))) => years,
                (401 | 403, _) => {
                    let mut lines = vec![line(
                        Status::Fail,
                        "paheko api",
                        format!(
                            "{}: {status}: Paheko refuses PAHEKO_API_USER / PAHEKO_API_PASSWORD (its API_USER and API_PASSWORD, or an API key with write access)",
                            api.url
                        ),
                    )];
                    lines.extend(skip("credentials refused"));
                    return lines;
                }
                _ => {
                    let mut lines = vec![line(
                        Status::Fail,
                        "paheko api",
                        format!(
                            "{}/api/accounting/years answered {status}: {} (is PAHEKO_URL Paheko's address?)",
                            api.url,
                            reduce(&body)
                        ),
                    )];
                    lines.extend(skip("no answer from Paheko's API"));
                    return lines;
                }
            }
        }
    };
    let mut lines = vec![line(
        Status::Ok,
        "paheko api",
        format!("{}: credentials accepted as {}", api.url, api.user),
    )];
    let today = booking::Date::of_unix({
        let now = crate::clock::unix_now() as i64;
        now + api.zone.offset_at(now) as i64
    })
    .to_string();
    let open = years.iter().find(|y| {
        y["status"].as_i64() == Some(0)
            && y["start_date"]
                .as_str()
                .is_some_and(|s| s <= today.as_str())
            && y["end_date"].as_str().is_some_and(|e| e >= today.as_str())
    });
    let Some(year) = open else {
        lines.push(line(
            Status::Fail,
            "open year",
            format!(
                "no open year of Paheko covers today ({today}, {}): every session would be held as no_open_year; open one in Paheko (Comptabilité → Exercices)",
                api.zone.name
            ),
        ));
        lines.push(line(Status::Skip, "accounts", "no open year".to_string()));
        return lines;
    };
    lines.push(line(
        Status::Ok,
        "open year",
        format!(
            "{} ({} to {}) covers today ({today})",
            year["label"].as_str().unwrap_or("?"),
            year["start_date"].as_str().unwrap_or("?"),
            year["end_date"].as_str().unwrap_or("?"),
        ),
    ));
    let codes = api.accounts.all_codes();
    let sql = format!(
        "SELECT code FROM acc_accounts WHERE id_chart = {} AND code IN ({})",
        year["id_chart"].as_i64().unwrap_or(0),
        codes.iter().map(|c| quote(c)).collect::<Vec<_>>().join(",")
    );
    match client.sql(&sql, Instant::now() + config.timeout) {
        Ok(rows) => {
            let found: Vec<&str> = rows.iter().filter_map(|r| r["code"].as_str()).collect();
            let missing: Vec<String> = codes
                .iter()
                .filter(|c| !found.contains(c))
                .map(|c| format!("{c} ({})", variable_of(&api.accounts, c)))
                .collect();
            if missing.is_empty() {
                lines.push(line(
                    Status::Ok,
                    "accounts",
                    format!("{} all in the year's chart", codes.join(", ")),
                ));
            } else {
                lines.push(line(
                    Status::Fail,
                    "accounts",
                    format!(
                        "not in the chart of {}: {}; sessions using them would be held as unknown_account",
                        year["label"].as_str().unwrap_or("the open year"),
                        missing.join(", ")
                    ),
                ));
            }
        }
        Err(Failed::Status { status, body, .. }) => lines.push(line(
            Status::Fail,
            "accounts",
            format!("/api/sql answered {status}: {body}"),
        )),
        Err(Failed::NoAnswer(why)) => lines.push(line(Status::Fail, "accounts", why)),
    }
    lines
}

/// The variable that names an account code, for a message.
fn variable_of(accounts: &booking::Accounts, code: &str) -> &'static str {
    if accounts.methods.iter().any(|(_, a)| a == code) {
        "PAHEKO_PUSH_PAYMENT_ACCOUNTS"
    } else if accounts.sales == code {
        "PAHEKO_PUSH_SALES_ACCOUNT"
    } else if accounts.shortage == code {
        "PAHEKO_PUSH_CASH_SHORTAGE_ACCOUNT"
    } else {
        "PAHEKO_PUSH_CASH_SURPLUS_ACCOUNT"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_quoted_for_api_sql() {
        assert_eq!(quote("RECYCLIQUE-abc"), "'RECYCLIQUE-abc'");
        assert_eq!(quote("it's"), "'it''s'");
        assert_eq!(quote("'; DROP"), "'''; DROP'");
    }

    #[test]
    fn html_pages_are_reduced_to_their_title() {
        let page = "<html><head><TITLE>Erreur interne</TITLE></head><body>SQLite: database is locked</body></html>";
        assert_eq!(
            reduce(page),
            "HTML page: Erreur interne (database is locked)"
        );
        assert_eq!(reduce("{\"error\":\"x\"}"), "{\"error\":\"x\"}");
        assert_eq!(reduce(&"é".repeat(2000)).len(), 1024);
    }

    #[test]
    fn totals_from_the_hash() {
        let hash: BTreeMap<String, String> = [
            ("sales", "1250"),
            ("items", "3"),
            ("tickets", "2"),
            ("m:especes", "1000"),
            ("m:cb", "250"),
            ("register_id", "R1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let t = totals_of(&hash);
        assert_eq!((t.sales, t.items, t.tickets), (1250, 3, 2));
        assert_eq!(t.methods.len(), 2);
        assert_eq!(t.methods["cb"], 250);
        assert_eq!(totals_of(&BTreeMap::new()), Totals::default());
    }

    #[test]
    fn pahekos_refusals_are_classified() {
        let entry = booking::Entry {
            date: booking::Date {
                year: 2026,
                month: 11,
                day: 30,
            },
            reference: "RECYCLIQUE-S".into(),
            label: String::new(),
            notes: String::new(),
            lines: Vec::new(),
        };
        for (message, code) in [
            (
                "Cannot find a valid open year matching \"match\"",
                Code::NoOpenYear,
            ),
            (
                "Le compte avec le code \"511\" sur la ligne 1 n'existe pas.",
                Code::UnknownAccount,
            ),
            ("Écriture non équilibrée", Code::RefusedByPaheko),
        ] {
            let hold = classify_refusal(&entry, message);
            assert_eq!(hold.code, code, "{message}");
            assert_eq!(hold.detail["paheko"], message);
        }
    }
}
