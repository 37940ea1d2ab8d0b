//! `paheko-push dead list|show|replay|drop` against dead letters the worker itself
//! wrote: each test runs the real worker against a sink that refuses some events (422)
//! plus an entry whose payload is not JSON, waits until they are in the dead-letter
//! stream, stops the worker, then drives the subcommands as an operator would.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::util::*;

const T: Duration = Duration::from_secs(20);
/// A stream name of the test's own, so the subcommands prove they read the worker's
/// configuration; the dead-letter stream is derived from it.
const STREAM: &str = "test:caisse";
const DEAD: &str = "test:caisse:dead";
const GROUP: &str = "recyclic-push";

const REFUSED_PAYLOAD: &str = r#"{"sale_id":"s-1","cash_session_id":"cs-1","refuse":true,"items":[{"sku":"A","qty":2}],"total":1.50}"#;
const DELIVERED_PAYLOAD: &str = r#"{"sale_id":"s-2","cash_session_id":"cs-2"}"#;
const INVALID_PAYLOAD: &str = "{not json";
const NOTED_PAYLOAD: &str = r#"{"session_id":"cs-3","refuse":true}"#;
/// A field of the producer's that shares its name with a dead-letter field.
const NOTE: &str = "closing note written by the producer";
const PAHEKO_SAYS: &str = r#"{"error":"unknown account 706"}"#;

/// Three dead letters written by the real worker, which has stopped.
struct Fixture {
    redis: RedisServer,
    /// Kept so the environment given to the subcommands is the worker's whole one.
    sink: Sink,
    /// Original IDs on the main stream.
    refused: String,
    invalid: String,
    noted: String,
}

impl Fixture {
    fn new() -> Fixture {
        let redis = RedisServer::start();
        let sink = Sink::start(|r| {
            if r.body_text().contains("\"refuse\":true") {
                Reply::status(422).with_body(PAHEKO_SAYS)
            } else {
                Reply::status(204)
            }
        });
        let mut conn = redis.conn();
        let ticket = "pos.ticket.created";
        let refused = xadd(
            &mut conn,
            STREAM,
            &[("event", ticket), ("payload", REFUSED_PAYLOAD)],
        );
        xadd(
            &mut conn,
            STREAM,
            &[("event", ticket), ("payload", DELIVERED_PAYLOAD)],
        );
        let invalid = xadd(
            &mut conn,
            STREAM,
            &[("event", ticket), ("payload", INVALID_PAYLOAD)],
        );
        let noted = xadd(
            &mut conn,
            STREAM,
            &[
                ("event", "pos.session.closed"),
                ("payload", NOTED_PAYLOAD),
                ("reason", NOTE),
            ],
        );
        let fixture = Fixture {
            redis,
            sink,
            refused,
            invalid,
            noted,
        };
        let mut worker = Worker::spawn(fixture.env());
        wait_until("3 dead letters and nothing pending", T, || {
            xlen(&mut conn, DEAD) == 3 && pending_count(&mut conn, STREAM, GROUP) == 0
        });
        fixture.sink.wait_for_count(3, T);
        worker.sigterm();
        assert!(worker.wait_exit(T).success(), "{}", worker.stderr());
        fixture
    }

    /// The worker's configuration, which the subcommands read too.
    fn env(&self) -> Vec<(String, String)> {
        env_with(
            base_env(&self.redis, &self.sink),
            [("REDIS_STREAM_PUSH_CAISSE", STREAM)],
        )
    }

    /// Runs `paheko-push dead <args>`.
    fn dead(&self, args: &[&str]) -> Finished {
        let mut all = vec!["dead"];
        all.extend_from_slice(args);
        let finished = Worker::run_to_end(&all, self.env());
        assert!(
            finished.log_lines().is_empty() && !finished.stderr.contains("starting"),
            "a dead subcommand must not start the worker or its logger\n{finished:?}"
        );
        finished
    }

    fn conn(&self) -> redis::Connection {
        self.redis.conn()
    }

    /// The dead-letter stream as a map from original ID to dead-letter ID.
    fn dead_ids(&self) -> HashMap<String, String> {
        stream_entries(&mut self.conn(), DEAD)
            .into_iter()
            .map(|(id, fields)| {
                let original = fields
                    .iter()
                    .rev()
                    .find(|(name, _)| name == "original_id")
                    .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
                    .expect("a dead letter has an original_id");
                (original, id)
            })
            .collect()
    }

    /// The fields the producer wrote for the entry `original` of the main stream.
    fn original_fields(&self, original: &str) -> Vec<(String, Vec<u8>)> {
        stream_entries(&mut self.conn(), STREAM)
            .into_iter()
            .find(|(id, _)| id == original)
            .map(|(_, fields)| fields)
            .expect("the original entry is still in the main stream")
    }
}

fn assert_code(finished: &Finished, code: i32) {
    assert_eq!(finished.code(), Some(code), "{finished:?}");
}

/// `fields` followed by the `idempotency_key` a replay adds.
fn with_key(mut fields: Vec<(String, Vec<u8>)>, key: &str) -> Vec<(String, Vec<u8>)> {
    fields.push(("idempotency_key".into(), key.as_bytes().to_vec()));
    fields
}

fn text_fields(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

#[test]
fn list_shows_each_dead_letter_as_a_table_and_as_json() {
    let f = Fixture::new();
    let dead = f.dead_ids();

    let table = f.dead(&["list"]);
    assert_code(&table, 0);
    assert_eq!(
        table.stderr,
        format!("paheko-push: 3 dead letters in {DEAD}\n")
    );
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{table:?}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "ORIGINAL", "ID", "EVENT", "REASON", "STATUS", "ATTEMPTS", "DEAD", "AT", "DETAIL"
        ]
    );
    let rows: HashMap<&str, Vec<&str>> = lines[1..]
        .iter()
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            (cells[1], cells)
        })
        .collect();
    let row = |original: &str| &rows[original][..6];
    assert_eq!(
        row(&f.refused),
        [
            dead[&f.refused].as_str(),
            &f.refused,
            "pos.ticket.created",
            "rejected",
            "422",
            "1"
        ]
    );
    assert_eq!(
        row(&f.invalid),
        [
            dead[&f.invalid].as_str(),
            &f.invalid,
            "pos.ticket.created",
            "invalid_payload",
            "-",
            "0"
        ]
    );
    assert_eq!(
        row(&f.noted),
        [
            dead[&f.noted].as_str(),
            &f.noted,
            "pos.session.closed",
            "rejected",
            "422",
            "1"
        ]
    );
    assert!(
        lines.iter().any(|l| l.ends_with(PAHEKO_SAYS)),
        "the table shows what Paheko answered\n{table:?}"
    );

    let json = f.dead(&["list", "--json"]);
    assert_code(&json, 0);
    assert_eq!(json.stderr, "");
    let items: Vec<Value> = serde_json::from_str(&json.stdout).expect("one JSON array");
    assert_eq!(items.len(), 3);
    let item = |original: &str| {
        items
            .iter()
            .find(|i| i["original_id"] == original)
            .unwrap_or_else(|| panic!("{original} in {items:?}"))
    };
    let refused = item(&f.refused);
    assert_eq!(refused["id"], dead[&f.refused].as_str());
    assert_eq!(refused["event"], "pos.ticket.created");
    assert_eq!(refused["reason"], "rejected");
    assert_eq!(refused["status"], 422);
    assert_eq!(refused["attempts"], 1);
    assert_eq!(refused["detail"], PAHEKO_SAYS);
    let dead_at = refused["dead_at"].as_str().unwrap();
    assert!(
        dead_at.len() == 24 && dead_at.ends_with('Z') && dead_at.as_bytes()[10] == b'T',
        "RFC 3339: {dead_at}"
    );
    let invalid = item(&f.invalid);
    assert_eq!(invalid["reason"], "invalid_payload");
    assert_eq!(invalid["status"], Value::Null);
    assert_eq!(invalid["attempts"], 0);
    assert!(
        invalid["detail"]
            .as_str()
            .unwrap()
            .starts_with("field payload: not JSON"),
        "{invalid}"
    );
    assert_eq!(
        item(&f.noted)["reason"],
        "rejected",
        "not the producer's field"
    );
}

#[test]
fn list_of_an_empty_dead_letter_stream() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let env = base_env(&redis, &sink);
    let table = Worker::run_to_end(&["dead", "list"], &env);
    assert_code(&table, 0);
    assert_eq!(table.stdout, "");
    assert!(table.stderr.contains("no dead letters"), "{table:?}");
    let json = Worker::run_to_end(&["dead", "list", "--json"], &env);
    assert_code(&json, 0);
    assert_eq!(json.stdout, "[]\n");
}

#[test]
fn show_prints_the_metadata_and_the_original_fields_with_the_payload_pretty() {
    let f = Fixture::new();
    let dead = f.dead_ids();

    let shown = f.dead(&["show", &dead[&f.refused]]);
    assert_code(&shown, 0);
    let expected = format!(
        "dead letter  {}
original ID  {}
reason       rejected
status       422
attempts     1
",
        dead[&f.refused], f.refused
    );
    assert!(shown.stdout.starts_with(&expected), "{shown:?}");
    assert!(
        shown
            .stdout
            .contains(&format!("\ndetail       {PAHEKO_SAYS}\n")),
        "{shown:?}"
    );
    let fields = r#"
original fields (2):
  event: pos.ticket.created
  payload:
    {
      "sale_id": "s-1",
      "cash_session_id": "cs-1",
      "refuse": true,
      "items": [
        {
          "sku": "A",
          "qty": 2
        }
      ],
      "total": 1.50
    }
"#;
    assert!(
        shown.stdout.ends_with(fields),
        "keys in order, numbers as written\n{shown:?}"
    );

    let shown = f.dead(&["show", &dead[&f.noted], &dead[&f.invalid]]);
    assert_code(&shown, 0);
    assert!(
        shown.stdout.contains("reason       rejected\n"),
        "{shown:?}"
    );
    assert!(
        shown.stdout.contains(&format!(
            "original fields (3):\n  event: pos.session.closed\n  payload:\n    {{\n      \"session_id\": \"cs-3\",\n      \"refuse\": true\n    }}\n  reason: {NOTE}\n"
        )),
        "the producer's own reason field is an original field\n{shown:?}"
    );
    assert!(shown.stdout.contains("status       -\n"), "{shown:?}");
    assert!(
        shown.stdout.contains(
            "  payload (not valid JSON: key must be a string at line 1 column 2):\n    {not json\n"
        ),
        "{shown:?}"
    );

    let unknown = f.dead(&["show", &dead[&f.refused], "1-1"]);
    assert_code(&unknown, 3);
    assert_eq!(unknown.stdout, "");
    assert!(
        unknown.stderr.starts_with(&format!(
            "paheko-push: unknown dead-letter ID 1-1 in {DEAD}"
        )),
        "{unknown:?}"
    );
}

#[test]
fn replay_puts_back_exactly_the_original_fields_and_a_worker_delivers_them() {
    let f = Fixture::new();
    let dead = f.dead_ids();
    let before = xlen(&mut f.conn(), STREAM);

    let replayed = f.dead(&["replay", &dead[&f.noted]]);
    assert_code(&replayed, 0);
    let (from, new_id) = replayed
        .stdout
        .trim_end()
        .split_once(' ')
        .expect("<dead-letter ID> <new ID>");
    assert_eq!(from, dead[&f.noted]);
    assert!(
        replayed
            .stderr
            .contains("replayed 1 dead letter onto test:caisse"),
        "{replayed:?}"
    );

    let main = stream_entries(&mut f.conn(), STREAM);
    assert_eq!(main.len() as u64, before + 1);
    let (last_id, fields) = main.last().unwrap();
    assert_eq!(last_id, new_id, "the new ID printed is the new entry's");
    assert_eq!(
        fields,
        &text_fields(&[
            ("event", "pos.session.closed"),
            ("payload", NOTED_PAYLOAD),
            ("reason", NOTE),
            ("idempotency_key", &f.noted),
        ]),
        "exactly the producer's fields, none of the dead-letter ones, and the first ID"
    );
    assert_eq!(fields, &with_key(f.original_fields(&f.noted), &f.noted));
    let left = f.dead_ids();
    assert_eq!(left.len(), 2);
    assert!(!left.contains_key(&f.noted), "gone from the dead letters");

    // Paheko fixed: a worker started again delivers the replayed entry, and only it.
    let fixed = Sink::ok();
    let env = env_with(
        base_env(&f.redis, &fixed),
        [("REDIS_STREAM_PUSH_CAISSE", STREAM)],
    );
    let mut worker = Worker::spawn(&env);
    let got = fixed.wait_for_count(1, T);
    assert_eq!(got[0].body_text(), NOTED_PAYLOAD, "the original body");
    assert_eq!(got[0].idempotency_key(), Some(f.noted.as_str()));
    assert_eq!(got[0].header("x-paheko-event"), Some("pos.session.closed"));
    wait_until("the replayed entry acknowledged", T, || {
        pending_count(&mut f.conn(), STREAM, GROUP) == 0
    });
    worker.sigterm();
    assert!(worker.wait_exit(T).success(), "{}", worker.stderr());
    assert_eq!(fixed.count(), 1, "nothing but the replayed entry was sent");
    assert_eq!(xlen(&mut f.conn(), DEAD), 2);
}

#[test]
fn replay_all_moves_every_dead_letter_back_in_the_producers_order() {
    let f = Fixture::new();
    let dead = f.dead_ids();
    let before = stream_entries(&mut f.conn(), STREAM);

    let replayed = f.dead(&["replay", "--all"]);
    assert_code(&replayed, 0);
    let pairs: Vec<(&str, &str)> = replayed
        .stdout
        .lines()
        .map(|l| l.split_once(' ').expect("<dead-letter ID> <new ID>"))
        .collect();
    let order = [&f.refused, &f.invalid, &f.noted];
    let expected_from: Vec<&str> = order.iter().map(|o| dead[*o].as_str()).collect();
    assert_eq!(
        pairs.iter().map(|p| p.0).collect::<Vec<_>>(),
        expected_from,
        "{replayed:?}"
    );
    assert_eq!(xlen(&mut f.conn(), DEAD), 0);

    let after = stream_entries(&mut f.conn(), STREAM);
    assert_eq!(after[..before.len()], before[..], "nothing else touched");
    let added = &after[before.len()..];
    assert_eq!(added.len(), 3);
    for ((new_id, fields), (original, (_, printed))) in added.iter().zip(order.iter().zip(&pairs)) {
        assert_eq!(new_id, printed);
        assert_eq!(
            fields,
            &with_key(f.original_fields(original), original),
            "{original}"
        );
    }

    let again = f.dead(&["replay", "--all"]);
    assert_code(&again, 0);
    assert_eq!(again.stdout, "");
    assert!(again.stderr.contains("no dead letters"), "{again:?}");
}

#[test]
fn an_unknown_id_among_known_ones_changes_nothing() {
    let f = Fixture::new();
    let dead = f.dead_ids();
    let dead_before = stream_entries(&mut f.conn(), DEAD);
    let main_before = stream_entries(&mut f.conn(), STREAM);
    let unchanged = |what: &Finished| {
        assert_eq!(stream_entries(&mut f.conn(), DEAD), dead_before, "{what:?}");
        assert_eq!(
            stream_entries(&mut f.conn(), STREAM),
            main_before,
            "{what:?}"
        );
    };

    let dropped = f.dead(&["drop", &dead[&f.refused], "1-1", &dead[&f.invalid]]);
    assert_code(&dropped, 3);
    assert_eq!(
        dropped.stderr,
        format!("paheko-push: unknown dead-letter ID 1-1 in {DEAD}; nothing was changed\n")
    );
    assert_eq!(dropped.stdout, "");
    unchanged(&dropped);

    let replayed = f.dead(&["replay", &dead[&f.refused], "1-1", "2-2"]);
    assert_code(&replayed, 3);
    assert!(
        replayed
            .stderr
            .contains("unknown dead-letter IDs 1-1, 2-2 in"),
        "{replayed:?}"
    );
    unchanged(&replayed);

    // The ID on the main stream is not the dead letter's: say which one to use.
    let original = f.dead(&["drop", &f.refused]);
    assert_code(&original, 3);
    assert!(
        original.stderr.contains(&format!(
            "{} (the original ID of dead letter {})",
            f.refused, dead[&f.refused]
        )),
        "{original:?}"
    );
    unchanged(&original);
}

#[test]
fn drop_says_what_it_drops_then_removes_only_that() {
    let f = Fixture::new();
    let dead = f.dead_ids();
    let main_before = stream_entries(&mut f.conn(), STREAM);

    let dropped = f.dead(&["drop", &dead[&f.invalid], &dead[&f.refused]]);
    assert_code(&dropped, 0);
    let lines: Vec<Vec<&str>> = dropped
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 2, "{dropped:?}");
    assert_eq!(
        lines[0][..4],
        [
            dead[&f.invalid].as_str(),
            &f.invalid,
            "pos.ticket.created",
            "invalid_payload"
        ]
    );
    assert_eq!(
        lines[1][..4],
        [
            dead[&f.refused].as_str(),
            &f.refused,
            "pos.ticket.created",
            "rejected"
        ]
    );
    assert_eq!(
        dropped.stderr,
        format!("paheko-push: dropped 2 dead letters from {DEAD}\n")
    );
    let left = f.dead_ids();
    assert_eq!(left.keys().collect::<Vec<_>>(), [&f.noted]);
    assert_eq!(stream_entries(&mut f.conn(), STREAM), main_before);

    let again = f.dead(&["drop", &dead[&f.refused]]);
    assert_code(&again, 3);
}

#[test]
fn usage_and_configuration_errors_exit_2() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let env = base_env(&redis, &sink);
    for args in [
        &["dead"][..],
        &["dead", "purge"],
        &["dead", "list", "--yaml"],
        &["dead", "list", "1-1"],
        &["dead", "show"],
        &["dead", "drop"],
        &["dead", "drop", "--all"],
        &["dead", "replay"],
        &["dead", "replay", "--all", "1-1"],
        &["dead", "show", "yesterday"],
    ] {
        let finished = Worker::run_to_end(args, &env);
        assert_code(&finished, 2);
        assert!(
            finished.stderr.starts_with("paheko-push: usage: "),
            "{args:?}: {finished:?}"
        );
        assert!(
            finished.stderr.contains("paheko-push dead list [--json]"),
            "{finished:?}"
        );
        assert_eq!(finished.stdout, "", "{args:?}");
    }

    let help = Worker::run_to_end(&["dead", "--help"], &env);
    assert_code(&help, 0);
    assert!(help.stdout.contains("3 unknown ID"), "{help:?}");

    let bad = env_with(env.clone(), [("PAHEKO_PUSH_LOG_FORMAT", "xml")]);
    let finished = Worker::run_to_end(&["dead", "list"], &bad);
    assert_code(&finished, 2);
    assert!(
        finished
            .stderr
            .starts_with("paheko-push: configuration: PAHEKO_PUSH_LOG_FORMAT"),
        "{finished:?}"
    );
}

#[test]
fn redis_unreachable_exits_1_without_the_password() {
    let password = "pw-Dead-Letters-42";
    let mut redis = RedisServer::start_with(&["--requirepass", password]);
    let sink = Sink::ok();
    let env = base_env(&redis, &sink);
    redis.stop();
    for args in [
        &["dead", "list"][..],
        &["dead", "replay", "--all"],
        &["dead", "drop", "1-1"],
    ] {
        let finished = Worker::run_to_end(args, &env);
        assert_code(&finished, 1);
        assert!(
            finished
                .stderr
                .starts_with("paheko-push: cannot reach Redis at redis+unix://"),
            "{finished:?}"
        );
        assert!(!finished.stderr.contains(password), "{finished:?}");
        assert!(finished.stderr.contains("pass=***"), "{finished:?}");
        assert_eq!(finished.stdout, "");
    }
}

/// Issue 8 §6: a ticket the plugin refused, then replayed, reaches the plugin under the
/// entry ID the producer gave it — as `Idempotency-Key`, `webhook-id` and `X-Request-Id`
/// (the payload names no request ID) — and with the body the plugin saw the first time,
/// byte for byte.
#[test]
fn a_replayed_ticket_keeps_its_first_id_as_idempotency_key_and_its_bytes() {
    let redis = RedisServer::start();
    let refusing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = std::sync::Arc::clone(&refusing);
    let sink = Sink::start(move |_| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::status(422).with_body(PAHEKO_SAYS)
        } else {
            Reply::status(204)
        }
    });
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("REDIS_STREAM_PUSH_CAISSE", STREAM),
            ("PAHEKO_PUSH_AUTH", "both"),
            (
                "PAHEKO_PLUGIN_SECRET",
                "whsec_cGFoZWtvLXB1c2ggc2lnbmluZyBrZXkgZm9yIHRlc3Rz",
            ),
        ],
    );
    let mut conn = redis.conn();
    let payload = r#"{ "sale_id":"s-9", "cash_session_id":"cs-9", "label":"café à 2 €" }"#;
    let first_id = xadd(
        &mut conn,
        STREAM,
        &[("event", "pos.ticket.created"), ("payload", payload)],
    );
    let worker = Worker::spawn(&env);
    wait_until("dead-lettered", T, || xlen(&mut conn, DEAD) == 1);
    let (dead_id, _) = stream_entries(&mut conn, DEAD).remove(0);

    refusing.store(false, std::sync::atomic::Ordering::SeqCst);
    let replayed = Worker::run_to_end(&["dead", "replay", &dead_id], &env);
    assert_code(&replayed, 0);
    let got = sink.wait_for_count(2, T);
    wait_until("the replay acknowledged", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    let (refused, accepted) = (&got[0], &got[1]);
    assert_ne!(
        replayed.stdout.split_whitespace().nth(1),
        Some(first_id.as_str()),
        "the replay is a new entry"
    );
    for r in [refused, accepted] {
        assert_eq!(r.idempotency_key(), Some(first_id.as_str()), "{r:?}");
        assert_eq!(r.header("webhook-id"), Some(first_id.as_str()), "{r:?}");
        assert_eq!(r.header("x-request-id"), Some(first_id.as_str()), "{r:?}");
    }
    assert_eq!(accepted.body, payload.as_bytes(), "the producer's bytes");
    assert_eq!(accepted.body, refused.body);
    assert_eq!(xlen(&mut conn, DEAD), 0);
    drop(worker);
}

/// Issue 8 §5: one replay script checks the dead letter is still there, puts it back
/// and deletes it in one step, so two replays of the same dead letter — here at the
/// same moment — put the ticket back once: one succeeds, the other finds nothing.
#[test]
fn a_dead_letter_replayed_twice_goes_back_once() {
    let f = Fixture::new();
    let dead = f.dead_ids();
    let before = xlen(&mut f.conn(), STREAM);
    let id = dead[&f.refused].clone();
    let env = f.env();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Worker::run_to_end(&["dead", "replay", &id], &env));
        let b = s.spawn(|| Worker::run_to_end(&["dead", "replay", &id], &env));
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut codes = [a.code(), b.code()];
    codes.sort();
    assert_eq!(codes, [Some(0), Some(3)], "{a:?}\n{b:?}");
    let again = f.dead(&["replay", &id]);
    assert_code(&again, 3);
    assert!(again.stderr.contains("unknown dead-letter ID"), "{again:?}");
    let main = stream_entries(&mut f.conn(), STREAM);
    assert_eq!(main.len() as u64, before + 1, "one entry back, not two");
    let back: Vec<_> = main
        .iter()
        .filter(|(_, fields)| {
            fields
                .iter()
                .any(|(n, v)| n == "idempotency_key" && v == f.refused.as_bytes())
        })
        .collect();
    assert_eq!(back.len(), 1);
    assert!(!f.dead_ids().contains_key(&f.refused));
}

/// Issue 8 §5: the dead-letter key holds a string, so the XADD of the dead letter
/// fails (WRONGTYPE). The ticket the plugin refused must stay pending — with
/// MULTI/EXEC the XACK ran anyway and the ticket was in neither place — and once the
/// key is fixed it is dead-lettered, once.
#[test]
fn a_dead_letter_redis_refuses_leaves_the_ticket_pending_until_it_can_be_written() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(422).with_body(PAHEKO_SAYS));
    let mut conn = redis.conn();
    redis::cmd("SET")
        .arg(DEAD)
        .arg("not a stream")
        .query::<()>(&mut conn)
        .unwrap();
    let id = xadd(
        &mut conn,
        STREAM,
        &[
            ("event", "pos.ticket.created"),
            ("payload", REFUSED_PAYLOAD),
        ],
    );
    let env = env_with(
        base_env(&redis, &sink),
        [("REDIS_STREAM_PUSH_CAISSE", STREAM)],
    );
    let _worker = Worker::spawn(&env);
    sink.wait_for_count(1, T);
    // Scripts that failed: only the dead-letter script can, here.
    let failed_scripts = |conn: &mut redis::Connection| -> u64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_eval"))
            .filter_map(|l| l.split(',').find_map(|f| f.strip_prefix("failed_calls=")))
            .map(|n| n.parse::<u64>().unwrap())
            .sum()
    };
    wait_until(
        "the dead letter refused twice (tried again), or the ticket acknowledged",
        T,
        || failed_scripts(&mut conn) >= 2 || pending_count(&mut conn, STREAM, GROUP) == 0,
    );
    assert_eq!(
        pending_count(&mut conn, STREAM, GROUP),
        1,
        "the refused ticket stays pending while its dead letter cannot be written"
    );
    redis::cmd("DEL").arg(DEAD).query::<()>(&mut conn).unwrap();
    wait_until("dead-lettered and acknowledged", T, || {
        xlen(&mut conn, DEAD) >= 1 && pending_count(&mut conn, STREAM, GROUP) == 0
    });
    let dead = stream_entries(&mut conn, DEAD);
    assert_eq!(dead.len(), 1, "written once");
    let original = dead[0]
        .1
        .iter()
        .find(|(n, _)| n == "original_id")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    assert_eq!(original.as_deref(), Some(id.as_str()));
    assert_eq!(sink.count(), 1, "refused once, not sent again");
}
