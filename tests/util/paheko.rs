//! A real Paheko 1.3.22.1 per test: unpacked from `../shared/paheko/` into the test's own
//! temp dir by `scripts/paheko prepare` (the script a person uses too), then served by
//! php-fpm behind nginx on a loopback port, both children of the test and killed on drop.
//!
//! After [`Paheko::start`] Paheko is initialised (admin account), has an open year on
//! the `fr_pca_2025` chart, and answers its REST API with `API_USER`/`API_PASSWORD`.
//! [`PahekoOptions::plugin`] also installs `plugin/recyclique/` with
//! `bin/paheko ext recyclique enable` (its install.php then creates the year and chart).
//!
//! The ledger is read only through Paheko's own REST API ([`Paheko::entries`],
//! [`Paheko::journal`], [`Paheko::sql`]), as an accountant's tools would: never from a
//! plugin's tables or the SQLite file. Amounts read through `/api/sql` are Paheko's
//! integer cents; the journal's are decimal euros, converted to cents here.
//!
//! When php-fpm, nginx or the tarball is missing, [`Paheko::start`] says so and returns
//! `None` (the test skips), except under CI, where it fails: `scripts/test` installs
//! them (`ensure_paheko_deps` in scripts/lib.sh).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use tempfile::TempDir;

use super::{under_ci, wait_until};

/// The script that unpacks and configures Paheko.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/paheko");
/// The tarball, beside the repository (read-only in CI).
pub const TARBALL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/paheko/paheko-1.3.22.1.tar.gz"
);
/// How long nginx and php-fpm may take to listen, and an API request to answer.
const T: Duration = Duration::from_secs(30);

/// What to boot besides a bare Paheko.
#[derive(Clone, Debug, Default)]
pub struct PahekoOptions {
    /// Install and enable the `recyclique` plugin (plugin/recyclique/).
    pub plugin: bool,
    /// The secret given to the plugin's install.php (`PAHEKO_PLUGIN_SECRET`); random
    /// when `None`.
    pub secret: Option<String>,
    /// Leave Paheko without a year and a chart (the plugin's install.php creates them).
    pub no_year: bool,
    /// nginx answers 503 to this share (percent) of POSTs to `/p/recyclique/` before
    /// Paheko sees them.
    pub fail_percent: u8,
    /// php-fpm children (4, as the README's measurements, when 0).
    pub children: u8,
}

/// One line of a ledger entry, amounts in cents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryLine {
    pub account: String,
    pub debit: i64,
    pub credit: i64,
    pub label: Option<String>,
}

/// One ledger entry (an `acc_transactions` row and its lines), read through `/api/sql`.
#[derive(Clone, Debug)]
pub struct Entry {
    pub id: i64,
    pub id_year: i64,
    pub date: String,
    pub label: String,
    pub reference: Option<String>,
    pub notes: Option<String>,
    pub lines: Vec<EntryLine>,
}

impl Entry {
    /// Σ debit − Σ credit on `account`, in cents.
    pub fn balance(&self, account: &str) -> i64 {
        self.lines
            .iter()
            .filter(|l| l.account == account)
            .map(|l| l.debit - l.credit)
            .sum()
    }

    pub fn debit(&self, account: &str) -> i64 {
        self.lines
            .iter()
            .filter(|l| l.account == account)
            .map(|l| l.debit)
            .sum()
    }

    pub fn credit(&self, account: &str) -> i64 {
        self.lines
            .iter()
            .filter(|l| l.account == account)
            .map(|l| l.credit)
            .sum()
    }
}

/// A running Paheko: nginx and php-fpm, killed on drop (their logs printed if the test
/// is failing).
pub struct Paheko {
    dir: TempDir,
    env: BTreeMap<String, String>,
    fpm: Child,
    nginx: Child,
}

/// `command` on PATH or in /usr/sbin.
fn which(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(command))
        .find(|p| p.is_file())
}

/// php-fpm is installed as php-fpm8.2 on Debian 12.
fn php_fpm() -> Option<PathBuf> {
    which("php-fpm").or_else(|| {
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
        found.pop()
    })
}

/// Says loudly that `what` is not checked; fails under CI, where nothing may be skipped.
pub fn skip_paheko(what: &str) {
    assert!(
        !under_ci(),
        "under CI nothing may be skipped: {what} (scripts/test installs it: ensure_paheko_deps \
         in scripts/lib.sh)"
    );
    let _ = std::io::stderr().write_all(
        format!(
            "\n!!!!!!!! SKIPPED: {what}: the real-Paheko test is NOT checked. Run scripts/test \
             (ensure_paheko_deps installs php8.2-fpm and nginx). Under CI=true this fails. \
             !!!!!!!!\n"
        )
        .as_bytes(),
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            == Some("0")
    })
}

/// An SQL string literal for `/api/sql`, which has no bind parameters: quotes doubled.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Decimal euros as Paheko's API writes them ("12.34", 12.34, "-0.5") → cents.
pub fn euros_to_cents(value: &Value) -> i64 {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Null => return 0,
        other => panic!("not an amount: {other}"),
    };
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let fraction = format!("{fraction:0<2}");
    let cents: i64 = whole.parse::<i64>().unwrap_or(0) * 100
        + fraction[..2]
            .parse::<i64>()
            .unwrap_or_else(|_| panic!("not an amount: {text}"));
    if negative { -cents } else { cents }
}

impl Paheko {
    /// A bare Paheko with an open year on `fr_pca_2025` (no plugin), or `None` when the
    /// tools are missing (see the module doc).
    pub fn start() -> Option<Paheko> {
        Paheko::start_with(PahekoOptions::default())
    }

    /// Paheko with the `recyclique` plugin installed with `secret`.
    pub fn with_plugin(secret: &str) -> Option<Paheko> {
        Paheko::start_with(PahekoOptions {
            plugin: true,
            secret: Some(secret.to_owned()),
            ..PahekoOptions::default()
        })
    }

    pub fn start_with(options: PahekoOptions) -> Option<Paheko> {
        let Some(fpm) = php_fpm() else {
            skip_paheko("php-fpm is not installed");
            return None;
        };
        let Some(nginx) = which("nginx") else {
            skip_paheko("nginx is not installed");
            return None;
        };
        if which("php").is_none() {
            skip_paheko("php (php8.2-cli) is not installed");
            return None;
        }
        if !Path::new(TARBALL).is_file() {
            skip_paheko(&format!("Paheko's tarball {TARBALL} is missing"));
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("paheko-")
            .tempdir_in("/tmp")
            .expect("creating Paheko's temp dir");
        let port = free_port();
        let mut prepare = Command::new(SCRIPT);
        prepare
            .arg("prepare")
            .arg(dir.path())
            .arg(port.to_string())
            .env("PAHEKO_TARBALL", TARBALL)
            .env_remove("PAHEKO_PLUGIN_SECRET");
        if options.plugin {
            prepare.arg("--plugin");
        }
        if options.no_year {
            prepare.arg("--no-year");
        }
        if options.fail_percent > 0 {
            prepare
                .arg("--fail-percent")
                .arg(options.fail_percent.to_string());
        }
        if options.children > 0 {
            prepare.arg("--children").arg(options.children.to_string());
        }
        if let Some(secret) = &options.secret {
            prepare.env("PAHEKO_PLUGIN_SECRET", secret);
        }
        let out = prepare
            .output()
            .unwrap_or_else(|e| panic!("running {SCRIPT}: {e}"));
        assert!(
            out.status.success(),
            "scripts/paheko prepare failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env: BTreeMap<String, String> = fs::read_to_string(dir.path().join("paheko.env"))
            .expect("reading paheko.env")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let log = |name: &str| {
            fs::File::create(dir.path().join("log").join(name)).expect("creating a log file")
        };
        let mut fpm_cmd = Command::new(fpm);
        fpm_cmd
            .arg("--nodaemonize")
            .arg("--fpm-config")
            .arg(dir.path().join("php-fpm.conf"));
        if is_root() {
            fpm_cmd.arg("--allow-to-run-as-root");
        }
        let fpm = fpm_cmd
            .stdin(Stdio::null())
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
            .arg(dir.path().join("log/nginx-error.log"))
            .stdin(Stdio::null())
            .stdout(log("nginx.stdout"))
            .stderr(log("nginx.stderr"))
            .spawn()
            .expect("starting nginx");
        let paheko = Paheko {
            dir,
            env,
            fpm,
            nginx,
        };
        wait_until("php-fpm's socket and nginx's port", T, || {
            paheko.dir.path().join("php-fpm.sock").exists()
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(paheko)
    }

    fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from paheko.env"))
    }

    /// `http://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        self.var("PAHEKO_URL").to_owned()
    }

    /// `http://127.0.0.1:PORT/p/recyclique/`, what the worker's PAHEKO_PLUGIN_URL is.
    pub fn plugin_url(&self) -> String {
        self.var("PAHEKO_PLUGIN_URL").to_owned()
    }

    pub fn port(&self) -> u16 {
        self.var("PAHEKO_PORT").parse().expect("PAHEKO_PORT")
    }

    pub fn api_user(&self) -> String {
        self.var("PAHEKO_API_USER").to_owned()
    }

    pub fn api_password(&self) -> String {
        self.var("PAHEKO_API_PASSWORD").to_owned()
    }

    /// The plugin secret given at install (the one in [`PahekoOptions::secret`]).
    pub fn plugin_secret(&self) -> String {
        self.var("PAHEKO_PLUGIN_SECRET").to_owned()
    }

    /// The admin's login: (email, password).
    pub fn admin(&self) -> (String, String) {
        (
            self.var("PAHEKO_ADMIN_EMAIL").to_owned(),
            self.var("PAHEKO_ADMIN_PASSWORD").to_owned(),
        )
    }

    /// The test's directory: `paheko-1.3.22.1/src`, `data/`, `log/`, the configs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Paheko's `src/` (for `php bin/paheko …`).
    pub fn src(&self) -> PathBuf {
        PathBuf::from(self.var("PAHEKO_SRC"))
    }

    /// Paheko's SQLite file (for assertions about the plugin's own tables only; the
    /// ledger is read through the API).
    pub fn database(&self) -> PathBuf {
        self.dir.path().join("data/association.sqlite")
    }

    /// The process id of php-fpm's master (its children serve the requests).
    pub fn fpm_pid(&self) -> u32 {
        self.fpm.id()
    }

    fn agent(&self) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(T))
            .build()
            .into()
    }

    fn basic(&self) -> String {
        let token = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.api_user(),
            self.api_password()
        ));
        format!("Basic {token}")
    }

    /// `GET /api/PATH` with the API credentials: status and body.
    pub fn api_get(&self, path: &str) -> (u16, String) {
        let url = format!("{}api/{}", self.url(), path.trim_start_matches('/'));
        let mut response = self
            .agent()
            .get(&url)
            .header("Authorization", self.basic())
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}\n{}", self.logs()));
        let status = response.status().as_u16();
        (
            status,
            response.body_mut().read_to_string().unwrap_or_default(),
        )
    }

    /// `GET /api/PATH`, which must answer 200 with JSON.
    pub fn api_json(&self, path: &str) -> Value {
        let (status, body) = self.api_get(path);
        assert_eq!(status, 200, "GET /api/{path} answered {status}: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET /api/{path}: not JSON ({e}): {body}"))
    }

    /// `POST /api/sql` with a SELECT (no bind parameters: [`quote`] the literals): the
    /// result rows.
    pub fn sql(&self, select: &str) -> Vec<Value> {
        let url = format!("{}api/sql", self.url());
        let mut response = self
            .agent()
            .post(&url)
            .header("Authorization", self.basic())
            .send(select)
            .unwrap_or_else(|e| panic!("POST {url}: {e}\n{}", self.logs()));
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().unwrap_or_default();
        assert_eq!(
            status, 200,
            "/api/sql answered {status} to {select}: {body}"
        );
        let json: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/api/sql: not JSON ({e}): {body}"));
        json["results"].as_array().cloned().unwrap_or_default()
    }

    /// The ledger entries whose reference is `reference` (several if something booked
    /// twice), with their lines, through `/api/sql`.
    pub fn entries(&self, reference: &str) -> Vec<Entry> {
        self.entries_where(&format!("t.reference = {}", quote(reference)))
    }

    /// Every ledger entry, with its lines.
    pub fn all_entries(&self) -> Vec<Entry> {
        self.entries_where("1")
    }

    fn entries_where(&self, condition: &str) -> Vec<Entry> {
        let rows = self.sql(&format!(
            "SELECT t.id, t.id_year, t.date, t.label, t.reference, t.notes, a.code, l.debit, \
             l.credit, l.label AS line_label FROM acc_transactions t \
             JOIN acc_transactions_lines l ON l.id_transaction = t.id \
             JOIN acc_accounts a ON a.id = l.id_account WHERE {condition} ORDER BY t.id, l.id"
        ));
        let mut entries: Vec<Entry> = Vec::new();
        for row in rows {
            let id = row["id"].as_i64().expect("id");
            if entries.last().is_none_or(|e| e.id != id) {
                entries.push(Entry {
                    id,
                    id_year: row["id_year"].as_i64().unwrap_or(0),
                    date: row["date"].as_str().unwrap_or("").to_owned(),
                    label: row["label"].as_str().unwrap_or("").to_owned(),
                    reference: row["reference"].as_str().map(str::to_owned),
                    notes: row["notes"].as_str().map(str::to_owned),
                    lines: Vec::new(),
                });
            }
            let entry = entries.last_mut().expect("just pushed");
            entry.lines.push(EntryLine {
                account: row["code"].as_str().unwrap_or("").to_owned(),
                debit: row["debit"].as_i64().unwrap_or(0),
                credit: row["credit"].as_i64().unwrap_or(0),
                label: row["line_label"].as_str().map(str::to_owned),
            });
        }
        entries
    }

    /// The id of the open year containing `date` (YYYY-MM-DD), through the API.
    pub fn year_id(&self, date: &str) -> Option<i64> {
        let years = self.api_json("accounting/years");
        years.as_array()?.iter().find_map(|y| {
            let start = y["start_date"].as_str()?;
            let end = y["end_date"].as_str()?;
            (start <= date && date <= end).then(|| y["id"].as_i64())?
        })
    }

    /// The journal of account `code` in year `year`
    /// (`/api/accounting/years/ID/account/journal?code=…`): its rows as Paheko gives
    /// them (on 1.3.22.1 its `debit`/`credit` are integer cents, unlike the decimal euros
    /// a transaction is POSTed with; [`euros_to_cents`] reads the latter).
    pub fn journal(&self, year: i64, code: &str) -> Vec<Value> {
        let json = self.api_json(&format!(
            "accounting/years/{year}/account/journal?code={code}"
        ));
        json.as_array().cloned().unwrap_or_default()
    }

    /// The statuses nginx answered on `path_prefix`, in order (from its access log).
    pub fn statuses(&self, path_prefix: &str) -> Vec<u16> {
        fs::read_to_string(self.dir.path().join("log/access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut fields = l.split_whitespace();
                let status = fields.next()?.parse().ok()?;
                let _method = fields.next()?;
                let uri = fields.next()?;
                uri.starts_with(path_prefix).then_some(status)
            })
            .collect()
    }

    /// User + system CPU time of php-fpm's children (the processes that ran Paheko), from
    /// /proc: what serving the requests cost Paheko so far.
    pub fn fpm_cpu(&self) -> Duration {
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let master = self.fpm.id().to_string();
        let mut total = 0u64;
        let Ok(procs) = fs::read_dir("/proc") else {
            return Duration::ZERO;
        };
        for entry in procs.flatten() {
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid … utime(14) stime(15): split after the comm's ')'.
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.get(1) != Some(&master.as_str()) {
                continue;
            }
            let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
            let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            total += utime + stime;
        }
        Duration::from_millis(total * 1000 / ticks)
    }

    /// Runs `php bin/paheko ARGS…` in this Paheko (environment `env` only).
    pub fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut command = Command::new("php");
        command
            .arg(self.src().join("bin/paheko"))
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin");
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().expect("running php bin/paheko")
    }

    /// The tail of nginx's and PHP's logs, for failure messages.
    pub fn logs(&self) -> String {
        [
            "init.log",
            "nginx-error.log",
            "nginx.stderr",
            "php-fpm.log",
            "php-fpm.stderr",
            "php-errors.log",
            "access.log",
        ]
        .iter()
        .map(|name| {
            let text =
                fs::read_to_string(self.dir.path().join("log").join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            format!("--- {name} ---\n{tail}\n")
        })
        .collect()
    }
}

impl Drop for Paheko {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: a killed master would leave its workers running.
        for child in [&mut self.nginx, &mut self.fpm] {
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        for child in [&mut self.nginx, &mut self.fpm] {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
