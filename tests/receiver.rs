//! The reference receiver of examples/plugin (issue 10 §5), served the way a Paheko host
//! serves PHP: nginx with TLS from a private CA, php-fpm, PDO/SQLite, all from the
//! system's packages, started here as processes with their configuration in a temp dir.
//! A real worker delivers several cash sessions to it through `kill -9` and a database
//! held busy (the receiver's 503s); then the SQLite file must hold every event once, in
//! stream order per session, with the repeats counted and not stored. Direct requests
//! check each answer of the contract.

use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::packaging::output;
use super::util::*;
use crate::tls_sink::TestPki;

const T: Duration = Duration::from_secs(60);
const RECEIVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/plugin/receive.php");
const PUSH_PATH: &str = "/p/recyclique/push.php";
const WHSEC: &str = "whsec_cGFoZWtvLXB1c2ggc2lnbmluZyBrZXkgZm9yIHRlc3Rz";
const WHSEC_KEY: &[u8] = b"paheko-push signing key for tests";

/// nginx and php-fpm serving receive.php, and the files they use.
struct Receiver {
    dir: tempfile::TempDir,
    pki: TestPki,
    port: u16,
    nginx: Child,
    fpm: Child,
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            == Some("0")
    })
}

/// php-fpm is installed as php-fpm8.2, php-fpm8.4…
fn php_fpm() -> Option<PathBuf> {
    if let Some(p) = which("php-fpm") {
        return Some(p);
    }
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/sbin")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("php-fpm"))
        })
        .collect();
    found.sort();
    let last = found.pop();
    if last.is_none() {
        skip("php-fpm is not installed (scripts/test installs the php-fpm package)");
    }
    last
}

impl Receiver {
    fn start() -> Option<Receiver> {
        let nginx = need("nginx", "nginx")?;
        let fpm = php_fpm()?;
        need("php", "php-cli")?;
        let dir = tempfile::Builder::new()
            .prefix("paheko-receiver-")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path().display().to_string();
        let pki = TestPki::generate();
        let www = dir.path().join("www");
        fs::create_dir_all(&www).unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        fs::copy(RECEIVER, www.join("receive.php")).unwrap();
        // The contract's own function, taken from the document (tests/signing.rs).
        fs::write(www.join("verify.php"), super::signing::snippet()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = is_root();
        fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "{user}daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n\
                   log_format st '$status $request_method $http_idempotency_key';\n\
                   access_log {d}/access.log st;\n\
                   client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;\n\
                   fastcgi_temp_path {d}/tmp/fastcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n\
                   server {{\n\
                     listen 127.0.0.1:{port} ssl;\n\
                     server_name localhost;\n\
                     ssl_certificate {cert};\n\
                     ssl_certificate_key {key};\n\
                     location = {PUSH_PATH} {{\n\
                       include /etc/nginx/fastcgi_params;\n\
                       fastcgi_param SCRIPT_FILENAME {d}/www/receive.php;\n\
                       fastcgi_pass unix:{d}/php-fpm.sock;\n\
                     }}\n\
                   }}\n\
                 }}\n",
                user = if root { "user root root;\n" } else { "" },
                cert = pki.server_cert().display(),
                key = pki.server_key().display(),
            ),
        )
        .unwrap();
        fs::write(
            dir.path().join("php-fpm.conf"),
            format!(
                "[global]\npid = {d}/php-fpm.pid\nerror_log = {d}/php-fpm.log\ndaemonize = no\n\
                 [receiver]\n{user}listen = {d}/php-fpm.sock\nlisten.mode = 0666\n\
                 pm = static\npm.max_children = 4\nclear_env = yes\n\
                 env[PAHEKO_PUSH_SECRET] = {WHSEC}\nenv[PAHEKO_PUSH_DB] = {d}/receiver.sqlite\n\
                 catch_workers_output = yes\nphp_admin_flag[log_errors] = on\n\
                 php_admin_value[error_log] = {d}/php-errors.log\n",
                user = if root {
                    "user = root\ngroup = root\n"
                } else {
                    ""
                },
            ),
        )
        .unwrap();
        let log = |name: &str| fs::File::create(dir.path().join(name)).unwrap();
        let mut fpm_cmd = Command::new(fpm);
        fpm_cmd
            .arg("--nodaemonize")
            .arg("--fpm-config")
            .arg(dir.path().join("php-fpm.conf"));
        if root {
            fpm_cmd.arg("--allow-to-run-as-root");
        }
        let fpm = fpm_cmd
            .stdout(log("php-fpm.stdout"))
            .stderr(log("php-fpm.stderr"))
            .spawn()
            .expect("starting php-fpm");
        let nginx = Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("nginx-error.log"))
            .stdout(log("nginx.stdout"))
            .stderr(log("nginx.stderr"))
            .spawn()
            .expect("starting nginx");
        let receiver = Receiver {
            dir,
            pki,
            port,
            nginx,
            fpm,
        };
        wait_until("php-fpm's socket and nginx's port", T, || {
            receiver.dir.path().join("php-fpm.sock").exists()
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(receiver)
    }

    fn url(&self) -> String {
        format!("https://localhost:{}{PUSH_PATH}", self.port)
    }

    fn ca(&self) -> PathBuf {
        self.pki.ca_pem()
    }

    fn database(&self) -> PathBuf {
        self.dir.path().join("receiver.sqlite")
    }

    /// The status of each request nginx answered, in order.
    fn statuses(&self) -> Vec<u16> {
        fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    }

    fn count(&self, status: impl Fn(u16) -> bool) -> usize {
        self.statuses().into_iter().filter(|s| status(*s)).count()
    }

    /// Every stored row, in arrival order (php-cli and PDO, as the receiver reads it).
    fn rows(&self) -> Vec<serde_json::Value> {
        let out = output(
            Command::new("php")
                .arg("-r")
                .arg(
                    r#"$db = new PDO('sqlite:' . $argv[1], null, null, [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);
                       echo json_encode($db->query('SELECT seq, idempotency_key, session_id, event_type, body, answer, repeats
                           FROM paheko_push_events ORDER BY seq')->fetchAll(PDO::FETCH_ASSOC));"#,
                )
                .arg(self.database()),
        );
        assert!(
            out.status.success(),
            "reading the receiver's database: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
    }

    /// Holds the database's write lock until dropped, as a long transaction would.
    fn lock(&self) -> Lock {
        let mut child = Command::new("php")
            .arg("-r")
            .arg(
                r#"$db = new PDO('sqlite:' . $argv[1], null, null, [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);
                   $db->exec('BEGIN IMMEDIATE'); echo "locked\n"; fgets(STDIN); $db->exec('COMMIT');"#,
            )
            .arg(self.database())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the locking php");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked", "the database could not be locked");
        Lock {
            stdin: child.stdin.take(),
            child,
        }
    }

    fn logs(&self) -> String {
        [
            "nginx-error.log",
            "nginx.stderr",
            "php-fpm.log",
            "php-fpm.stderr",
            "php-errors.log",
            "access.log",
        ]
        .iter()
        .map(|name| {
            let text = fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            format!("--- {name} ---\n{tail}\n")
        })
        .collect()
    }

    /// POSTs `body` with `headers` (plus the content type), trusting the private CA.
    fn post(&self, headers: &[(&str, String)], body: &str) -> (u16, Vec<(String, String)>, String) {
        let ca = CertificateDer::from_pem_file(self.ca()).unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(10)))
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::from(vec![
                        ureq::tls::Certificate::from_der(&ca).to_owned(),
                    ]))
                    .build(),
            )
            .build()
            .into();
        let mut request = agent
            .post(&self.url())
            .header("Content-Type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let mut response = request
            .send(body)
            .unwrap_or_else(|e| panic!("POST to the receiver: {e}\n{}", self.logs()));
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let text = response.body_mut().read_to_string().unwrap();
        (status, headers, text)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        for child in [&mut self.nginx, &mut self.fpm] {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

struct Lock {
    stdin: Option<ChildStdin>,
    child: Child,
}

impl Drop for Lock {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Standard Webhooks headers for `body` under `id`, signed now with `key`.
fn signed(key: &[u8], id: &str, body: &str) -> Vec<(&'static str, String)> {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
        format!("{id}.{ts}.{body}").as_bytes(),
    );
    vec![
        ("Idempotency-Key", id.to_string()),
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", ts),
        (
            "webhook-signature",
            format!("v1,{}", STANDARD.encode(mac.as_ref())),
        ),
    ]
}

fn opened(session: &str) -> String {
    format!(
        r#"{{"session_id":"{session}","operator_id":"op-1","register_id":"reg-1","site_id":"site-1","initial_amount":5000,"opened_at":"2026-11-28T09:00:00Z","session_type":"real"}}"#
    )
}

fn closed(session: &str) -> String {
    format!(
        r#"{{"session_id":"{session}","closed_at":"2026-11-28T18:00:00Z","total_sales":1800,"total_items":12}}"#
    )
}

/// Publishes, round robin over `sessions`, event number `n` of each (0: opened, 1..=6:
/// tickets, 7: closed); returns (entry ID, session, event type, payload).
fn publish_round(
    conn: &mut redis::Connection,
    sessions: &[&str],
    n: usize,
) -> Vec<(String, String, String, String)> {
    sessions
        .iter()
        .map(|s| {
            let (event, payload) = match n {
                0 => ("pos.session.opened", opened(s)),
                7 => ("pos.session.closed", closed(s)),
                _ => ("pos.ticket.created", ticket(s, &format!("{s}-sale-{n}"))),
            };
            let id = xadd(conn, STREAM, &[("event", event), ("payload", &payload)]);
            (id, s.to_string(), event.to_string(), payload)
        })
        .collect()
}

#[test]
fn the_reference_receiver_stores_every_event_once_in_order_through_kill_9_and_503s() {
    let Some(receiver) = Receiver::start() else {
        return;
    };
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    let sessions = ["cs-a", "cs-b", "cs-c", "cs-d"];
    let mut published = Vec::new();
    for n in 0..4 {
        published.extend(publish_round(&mut conn, &sessions, n));
    }
    let ca = receiver.ca();
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PLUGIN_URL", receiver.url().as_str()),
            ("PAHEKO_PUSH_ALLOW_HTTP", "false"),
            ("PAHEKO_PLUGIN_CA_FILE", ca.to_str().unwrap()),
            ("PAHEKO_PUSH_AUTH", "signature"),
            ("PAHEKO_PLUGIN_SECRET", WHSEC),
            ("PAHEKO_PUSH_TIMEOUT_SECONDS", "5"),
            ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "6"),
        ],
    );
    let mut worker = Worker::spawn(&env);
    wait_until("4 events stored", T, || receiver.count(|s| s == 200) >= 4);

    // The database held busy: the receiver answers 503 + Retry-After; the worker is
    // killed while it waits, and the rest of the sessions is published meanwhile.
    {
        let _lock = receiver.lock();
        wait_until("three 503s", T, || receiver.count(|s| s == 503) >= 3);
        worker.kill9();
        for n in 4..8 {
            published.extend(publish_round(&mut conn, &sessions, n));
        }
    }
    let mut worker = Worker::spawn(&env);
    let stored_before = receiver.count(|s| s == 200);
    wait_until("more events stored", T, || {
        receiver.count(|s| s == 200) >= stored_before + 3
    });
    // Killed again in full flow, between answers and acknowledgements: it must have had
    // work in hand (issue 15 §10), entries read and not acknowledged; those the receiver
    // already stored are the repeats it must recognise.
    worker.kill9();
    let in_hand = pending_ids(&mut conn, STREAM, GROUP);
    assert!(
        !in_hand.is_empty(),
        "the second kill found nothing in flight"
    );
    let stored_unacked = receiver
        .rows()
        .iter()
        .filter(|r| {
            r["idempotency_key"]
                .as_str()
                .is_some_and(|k| in_hand.iter().any(|p| p == k))
        })
        .count();
    eprintln!(
        "second kill: {} entries in hand, {stored_unacked} of them stored by the receiver",
        in_hand.len()
    );
    let worker = Worker::spawn(&env);
    wait_until("every event answered 2xx and acknowledged", T, || {
        receiver.count(|s| s == 200) >= published.len()
            && pending_count(&mut conn, STREAM, GROUP) == 0
            && {
                let stored = receiver.rows().len();
                assert!(
                    stored <= published.len(),
                    "{stored} rows for {} events: a repeat was stored",
                    published.len()
                );
                stored == published.len()
            }
    });
    drop(worker);
    assert_eq!(sink.count(), 0, "the worker posted to the sink");

    let rows = receiver.rows();
    // Every event once, byte for byte, under its entry ID.
    let mut keys: Vec<&str> = rows
        .iter()
        .map(|r| r["idempotency_key"].as_str().unwrap())
        .collect();
    keys.sort();
    let mut ids: Vec<&str> = published.iter().map(|p| p.0.as_str()).collect();
    ids.sort();
    assert_eq!(keys, ids);
    for (id, session, event, payload) in &published {
        let row = rows
            .iter()
            .find(|r| r["idempotency_key"] == id.as_str())
            .unwrap();
        assert_eq!(row["session_id"], session.as_str());
        assert_eq!(row["event_type"], event.as_str());
        assert_eq!(row["body"], payload.as_str());
    }
    // In stream order per session: stored in the order of their entry IDs, opened first,
    // closed last.
    for session in sessions {
        let stored: Vec<&str> = rows
            .iter()
            .filter(|r| r["session_id"] == session)
            .map(|r| r["idempotency_key"].as_str().unwrap())
            .collect();
        let in_stream: Vec<&str> = published
            .iter()
            .filter(|p| p.1 == session)
            .map(|p| p.0.as_str())
            .collect();
        assert_eq!(stored, in_stream, "{session} out of order");
        let types: Vec<&str> = rows
            .iter()
            .filter(|r| r["session_id"] == session)
            .map(|r| r["event_type"].as_str().unwrap())
            .collect();
        assert_eq!(types.first(), Some(&"pos.session.opened"));
        assert_eq!(types.last(), Some(&"pos.session.closed"));
    }
    // The repeats were answered 2xx and counted, not stored: every 200 nginx logged is
    // a stored row or a counted repeat. A request cut by kill -9 (nginx logs 499, the
    // client went away) may have been committed or counted too.
    let repeats: u64 = rows.iter().map(|r| r["repeats"].as_u64().unwrap()).sum();
    let answered = receiver.count(|s| s == 200) as u64;
    let cut = receiver.count(|s| s == 499) as u64;
    let handled = published.len() as u64 + repeats;
    assert!(
        (answered..=answered + cut).contains(&handled),
        "{} rows + {repeats} repeats, {answered} answered 200, {cut} cut: {:?}",
        published.len(),
        receiver.statuses()
    );
    let busy = receiver.count(|s| s == 503);
    assert!(busy >= 3);
    let others: Vec<u16> = receiver
        .statuses()
        .into_iter()
        .filter(|s| ![200, 503, 499].contains(s))
        .collect();
    assert!(others.is_empty(), "unexpected answers: {others:?}");
    let _ = std::io::stderr().write_all(
        format!(
            "receiver: {} events stored once, {answered} answered 200, {repeats} repeats dropped, {busy} answered 503, {cut} cut by kill -9\n",
            rows.len()
        )
        .as_bytes(),
    );

    // A repeat sent by hand: answered as the first time, counted, not stored.
    let first = &rows[0];
    let key = first["idempotency_key"].as_str().unwrap();
    let body = first["body"].as_str().unwrap();
    let mut headers = signed(WHSEC_KEY, key, body);
    headers.push((
        "X-Paheko-Event",
        first["event_type"].as_str().unwrap().to_string(),
    ));
    let (status, _, text) = receiver.post(&headers, body);
    assert_eq!(
        (status, text.trim()),
        (200, first["answer"].as_str().unwrap())
    );
    let after = receiver.rows();
    assert_eq!(after.len(), rows.len());
    assert_eq!(
        after[0]["repeats"].as_u64(),
        Some(first["repeats"].as_u64().unwrap() + 1)
    );
}

#[test]
fn the_reference_receiver_answers_as_the_contract_says() {
    let Some(receiver) = Receiver::start() else {
        return;
    };
    let body = ticket("cs-x", "sale-x");
    let header = |name: &'static str, value: &str| (name, value.to_string());

    // A new event, signed: 200 once committed.
    let (status, _, text) = receiver.post(&signed(WHSEC_KEY, "1800000000000-0", &body), &body);
    assert_eq!((status, text.trim()), (200, "stored 1800000000000-0"));
    // The secret header, as the Python worker sends it: accepted too.
    let other = ticket("cs-x", "sale-y");
    let (status, _, _) = receiver.post(
        &[
            header("Idempotency-Key", "1800000000000-1"),
            header("X-Paheko-Secret", WHSEC),
        ],
        &other,
    );
    assert_eq!(status, 200);

    // 401: a wrong secret, a signature made with another key, or a tampered body.
    let (status, _, text) = receiver.post(
        &[
            header("Idempotency-Key", "1800000000000-2"),
            header("X-Paheko-Secret", "not-the-secret"),
        ],
        &body,
    );
    assert_eq!((status, text.trim()), (401, "wrong secret"));
    let (status, _, _) = receiver.post(&signed(b"another key", "1800000000000-2", &body), &body);
    assert_eq!(status, 401);
    let (status, _, _) = receiver.post(
        &signed(WHSEC_KEY, "1800000000000-2", &body),
        &body.replace("sale-x", "sale-z"),
    );
    assert_eq!(status, 401);
    let (status, _, _) = receiver.post(&[header("Idempotency-Key", "1800000000000-2")], &body);
    assert_eq!(status, 401);

    // 422: what no retry could make acceptable, with the reason.
    let (status, _, text) = receiver.post(
        &signed(WHSEC_KEY, "1800000000000-3", "not json"),
        "not json",
    );
    assert_eq!(
        (status, text.trim()),
        (422, "the body is not a JSON object")
    );
    let unknown = r#"{"event":"pos.drawer.opened","session_id":"cs-x"}"#;
    let (status, _, text) = receiver.post(&signed(WHSEC_KEY, "1800000000000-4", unknown), unknown);
    assert_eq!(status, 422);
    assert!(text.contains("unknown event type"), "{text}");
    let (status, _, text) = receiver.post(&signed(WHSEC_KEY, "not-an-id", &body), &body);
    assert_eq!(
        (status, text.trim()),
        (422, "missing or malformed Idempotency-Key")
    );

    // 503 with Retry-After while the database is busy; then the same request is stored.
    let third = ticket("cs-x", "sale-3");
    {
        let _lock = receiver.lock();
        let (status, headers, text) =
            receiver.post(&signed(WHSEC_KEY, "1800000000000-5", &third), &third);
        assert_eq!((status, text.trim()), (503, "database busy"));
        assert!(
            headers
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case("retry-after") && v == "1"),
            "{headers:?}"
        );
    }
    let (status, _, _) = receiver.post(&signed(WHSEC_KEY, "1800000000000-5", &third), &third);
    assert_eq!(status, 200);

    let rows = receiver.rows();
    let keys: Vec<&str> = rows
        .iter()
        .map(|r| r["idempotency_key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["1800000000000-0", "1800000000000-1", "1800000000000-5"]
    );
    assert!(
        !fs::read_to_string(receiver.dir.path().join("access.log"))
            .unwrap()
            .contains(WHSEC)
    );
}
