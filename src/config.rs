//! Configuration, in two steps: [`Raw`] is what the environment (and an optional `.env`
//! file) says, as strings; [`Config::from_raw`] validates it into durations, URLs and
//! numbers, or fails naming the variable and what it accepts. Nothing here touches Redis
//! or the network, so a bad value stops the program before it does anything.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
pub const DEFAULT_STREAM: &str = "recyclic:push:caisse";
pub const DEFAULT_GROUP: &str = "recyclic-push";
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:9187";

/// The variables as the environment gives them. Every field is a string so that a bad
/// value is reported by [`Config::from_raw`] with the variable's name, not by serde.
#[derive(Debug, Default, Deserialize)]
pub struct Raw {
    pub redis_url: Option<String>,
    pub redis_stream_push_caisse: Option<String>,
    pub paheko_push_group: Option<String>,
    pub paheko_push_consumer: Option<String>,
    pub paheko_plugin_url: Option<String>,
    pub paheko_plugin_secret: Option<String>,
    pub paheko_plugin_secret_file: Option<String>,
    pub paheko_push_max_retries: Option<String>,
    pub paheko_push_backoff_seconds: Option<String>,
    pub paheko_push_backoff_factor: Option<String>,
    pub paheko_push_max_backoff_seconds: Option<String>,
    pub paheko_push_concurrency: Option<String>,
    pub paheko_push_timeout_seconds: Option<String>,
    pub paheko_push_claim_idle_seconds: Option<String>,
    pub paheko_push_order_keys: Option<String>,
    pub paheko_push_dead_letter_stream: Option<String>,
    pub paheko_push_allow_http: Option<String>,
    pub paheko_push_health_addr: Option<String>,
    pub paheko_push_log: Option<String>,
    pub paheko_push_log_format: Option<String>,
    pub paheko_push_backlog_warn: Option<String>,
    pub paheko_push_breaker_threshold: Option<String>,
    pub paheko_push_max_deliveries: Option<String>,
    pub paheko_push_dead_letter_statuses: Option<String>,
    pub paheko_push_give_up_after_parks: Option<String>,
    pub paheko_push_lease_seconds: Option<String>,
    pub paheko_push_forget_consumers_after_seconds: Option<String>,
    pub paheko_push_auth: Option<String>,
    pub paheko_plugin_ca_file: Option<String>,
    pub redis_ca_file: Option<String>,
    pub paheko_push_target: Option<String>,
    pub paheko_url: Option<String>,
    pub paheko_api_user: Option<String>,
    pub paheko_api_password: Option<String>,
    pub paheko_api_password_file: Option<String>,
    pub paheko_push_payment_accounts: Option<String>,
    pub paheko_push_sales_account: Option<String>,
    pub paheko_push_cash_shortage_account: Option<String>,
    pub paheko_push_cash_surplus_account: Option<String>,
    pub paheko_push_timezone: Option<String>,
    pub paheko_push_run_as: Option<String>,
    /// Where these came from (not a variable).
    #[serde(skip)]
    pub source: Source,
}

/// The configuration file the Debian package installs. The operator commands
/// (`check`, `health`, `dead`) read it when nothing else configures them (see
/// [`Raw::from_env`]); the service gets it from systemd's `EnvironmentFile=`.
pub const PACKAGE_ENV_FILE: &str = "/etc/paheko-push/paheko-push.env";

/// Where the configuration came from besides the environment, for `check` and the
/// operator commands to say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    /// The file of variables read: `./.env`, `PAHEKO_PUSH_ENV_FILE`, or the package's.
    pub file: Option<PathBuf>,
    /// The secret file paired with it (`secret` beside `paheko-push.env`, `SHOP.secret`
    /// beside `SHOP.env`), when the configuration named no secret itself.
    pub secret_file: Option<PathBuf>,
    /// The package's file, which would have been read but this user may not read.
    pub unreadable: Option<PathBuf>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, &self.secret_file) {
            (None, _) => match &self.unreadable {
                None => f.write_str("the environment"),
                Some(p) => write!(
                    f,
                    "the environment alone ({} is there, but this user may not read it: run as root)",
                    p.display()
                ),
            },
            (Some(file), None) => write!(f, "{}", file.display()),
            (Some(file), Some(secret)) => {
                write!(f, "{} and the secret {}", file.display(), secret.display())
            }
        }
    }
}

impl Raw {
    /// Reads the process environment, completed by one file of variables, the first
    /// of (issue 14 §2):
    /// 1. `PAHEKO_PUSH_ENV_FILE`, when set (it must exist);
    /// 2. `dir/.env`, when it exists;
    /// 3. `package` (the operator commands pass [`PACKAGE_ENV_FILE`]), when it exists
    ///    and the environment sets no `REDIS_…` or `PAHEKO_…` variable: an operator who
    ///    exported a configuration meant that one, not a mix of it and the package's.
    ///
    /// A variable set in the real environment always wins over the file. A file read
    /// by rule 1 or 3 brings its secret along when nothing names one: `secret` beside
    /// `paheko-push.env`, `NAME.secret` beside `NAME.env`, the package's layout.
    pub fn from_env(dir: &Path, package: Option<&Path>) -> Result<Raw, ConfigError> {
        Raw::from_env_vars(std::env::vars(), dir, package)
    }

    /// [`Raw::from_env`] with the environment given.
    pub fn from_env_vars(
        env: impl IntoIterator<Item = (String, String)>,
        dir: &Path,
        package: Option<&Path>,
    ) -> Result<Raw, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let named = env
            .iter()
            .find(|(k, v)| k == "PAHEKO_PUSH_ENV_FILE" && !v.trim().is_empty())
            .map(|(_, v)| PathBuf::from(v.trim()));
        let configured = env.iter().any(|(k, _)| {
            (k.starts_with("REDIS_") || k.starts_with("PAHEKO_")) && k != "PAHEKO_PUSH_ENV_FILE"
        });
        let dotenv = dir.join(".env");
        let mut unreadable = None;
        let (file, pairs) = if let Some(named) = named {
            if !named.is_file() {
                return Err(err(
                    "PAHEKO_PUSH_ENV_FILE",
                    format!("{} does not exist or is not a file", named.display()),
                ));
            }
            (Some(named), true)
        } else if dotenv.is_file() {
            (Some(dotenv), false)
        } else {
            match package {
                // A user the package's file (root's, 0640) is not for, such as a
                // monitoring script's, goes on with the environment alone, told so.
                Some(p) if !configured && p.is_file() => match std::fs::File::open(p) {
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                        unreadable = Some(p.to_path_buf());
                        (None, false)
                    }
                    _ => (Some(p.to_path_buf()), true),
                },
                _ => (None, false),
            }
        };
        let mut vars: HashMap<String, String> = HashMap::new();
        let mut source = Source {
            unreadable,
            ..Source::default()
        };
        if let Some(file) = &file {
            let shown = file.display().to_string();
            let text = std::fs::read_to_string(file).map_err(|e| {
                err(
                    &shown,
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        format!("cannot read it: {e} (run the command as root, or set the variables yourself)")
                    } else {
                        format!("cannot read it: {e}")
                    },
                )
            })?;
            let read = parse_dotenv(&text).map_err(|mut e| {
                if e.var == ".env" {
                    e.var = shown.clone();
                }
                e
            })?;
            vars.extend(read);
            source.file = Some(file.clone());
        }
        vars.extend(env);
        let names_secret = |k: &str| vars.get(k).is_some_and(|v| !v.trim().is_empty());
        if pairs
            && !names_secret("PAHEKO_PLUGIN_SECRET")
            && !names_secret("PAHEKO_PLUGIN_SECRET_FILE")
            && let Some(secret) = file.as_deref().and_then(paired_secret)
            && secret.is_file()
        {
            vars.insert(
                "PAHEKO_PLUGIN_SECRET_FILE".into(),
                secret.display().to_string(),
            );
            source.secret_file = Some(secret);
        }
        let mut raw = Raw::from_vars(vars)?;
        raw.source = source;
        Ok(raw)
    }

    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Raw, ConfigError> {
        envy::from_iter(vars).map_err(|e| ConfigError {
            var: "environment".into(),
            problem: e.to_string(),
        })
    }
}

/// The secret that goes with a file of variables in the package's layout: `secret`
/// beside `paheko-push.env`, `NAME.secret` beside `NAME.env`.
fn paired_secret(file: &Path) -> Option<PathBuf> {
    let name = file.file_name()?.to_str()?;
    let stem = name.strip_suffix(".env")?;
    Some(file.with_file_name(if stem == "paheko-push" {
        "secret".to_string()
    } else {
        format!("{stem}.secret")
    }))
}

/// Reads a `.env` file's variables the way docker compose and python-dotenv do, for
/// RecyClique's `.env` is written for them (issue 8 §7): `#` comment lines, an inline
/// ` # comment` after an unquoted value, an optional `export ` prefix, single quotes
/// (literal), double quotes (with `\"`, `\\`, `\$`, `\n` escapes), `${VAR}`
/// references and quoted values running over several lines. The parsing is the
/// `dotenvy` crate's. A line it cannot read stops the start, naming the line and the
/// variable but never the value, which may be a secret.
pub fn parse_dotenv(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    dotenvy::from_read_iter(text.as_bytes())
        .map(|item| item.map_err(|e| dotenv_error(text, e)))
        .collect()
}

/// A `dotenvy` error in words that locate the line without quoting it.
fn dotenv_error(text: &str, e: dotenvy::Error) -> ConfigError {
    let dotenvy::Error::LineParse(bad, _) = e else {
        // The text is already in memory and UTF-8: only a parse error can happen. The
        // other variants' messages could quote a value, so none is shown.
        return err(".env", "cannot be read");
    };
    let bad = bad.trim_end();
    let located = (!bad.is_empty())
        .then(|| text.find(bad))
        .flatten()
        .map(|at| {
            let number = text[..at].matches('\n').count() + 1;
            let line = text[text[..at].rfind('\n').map_or(0, |n| n + 1)..]
                .lines()
                .next()
                .unwrap_or("");
            let line = line.trim_start();
            let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
            let key: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                .collect();
            if key.is_empty() {
                format!("line {number}")
            } else {
                format!("line {number} ({key})")
            }
        });
    err(
        ".env",
        format!(
            "{} is not KEY=value as docker compose reads it: quote a value that holds \
             spaces, close every quote, and use only the escapes \\\" \\\\ \\$ \\n \
             inside double quotes (the value is not shown: it may be a secret)",
            located.as_deref().unwrap_or("a line")
        ),
    )
}

/// A variable with a value the program cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub var: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.var, self.problem)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Where to deliver, and with which secret. Absent when the plugin URL or the secret is
/// missing: the worker then stays up without consuming, as the Python worker did.
#[derive(Clone)]
pub struct Plugin {
    pub url: String,
    pub secret: String,
    pub auth: Auth,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("url", &redact_url(&self.url))
            .field("secret", &"[redacted]")
            .field("auth", &self.auth)
            .finish()
    }
}

/// How a request proves it comes from this worker (`PAHEKO_PUSH_AUTH`); see
/// [`crate::sign`] and docs/plugin-contract.md.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// The secret itself in `X-Paheko-Secret`, as the Python worker sent it.
    Header,
    /// Standard Webhooks signature headers, made with `key`; the secret never travels.
    Signature { key: Vec<u8> },
    /// Both, while a plugin moves from the header to the signature.
    Both { key: Vec<u8> },
}

impl Auth {
    /// True when `X-Paheko-Secret` is sent.
    pub fn sends_secret(&self) -> bool {
        matches!(self, Auth::Header | Auth::Both { .. })
    }

    /// The HMAC key, when requests are signed.
    pub fn signing_key(&self) -> Option<&[u8]> {
        match self {
            Auth::Header => None,
            Auth::Signature { key } | Auth::Both { key } => Some(key),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Auth::Header => "header",
            Auth::Signature { .. } => "signature",
            Auth::Both { .. } => "both",
        }
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A PEM bundle of certificate authorities to trust besides the built-in Mozilla roots
/// (`PAHEKO_PLUGIN_CA_FILE`, `REDIS_CA_FILE`), read and checked at start-up.
#[derive(Clone, PartialEq, Eq)]
pub struct CaFile {
    pub path: String,
    /// The file as read, PEM.
    pub pem: Vec<u8>,
    /// Its certificates, DER; never empty.
    pub certs: Vec<Vec<u8>>,
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({} certificates)", self.path, self.certs.len())
    }
}

/// How failed deliveries are retried; see [`crate::retry`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryConfig {
    /// In-line attempts for one event before it is parked.
    pub max_attempts: u32,
    pub backoff: Duration,
    pub factor: f64,
    pub max_backoff: Duration,
}

/// The validated configuration.
#[derive(Clone)]
pub struct Config {
    pub redis_url: String,
    pub stream: String,
    pub group: String,
    pub consumer: String,
    pub plugin: Result<Plugin, Missing>,
    pub retry: RetryConfig,
    pub concurrency: usize,
    pub timeout: Duration,
    pub claim_idle: Duration,
    pub order_keys: Vec<String>,
    pub dead_letter_stream: String,
    /// Plain http:// may be used: PAHEKO_PUSH_ALLOW_HTTP, or an http:// URL with
    /// PAHEKO_PUSH_AUTH=signature (the secret never travels).
    pub allow_http: bool,
    pub health_addr: Option<String>,
    pub log_level: log::LevelFilter,
    pub log_format: LogFormat,
    /// Backlog (pending + unread) above which /health warns.
    pub backlog_warn: u64,
    /// Consecutive transient failures that open the circuit breaker; 0 disables it.
    pub breaker_threshold: u32,
    /// Deliveries (reads by a consumer) after which an entry is dead-lettered; 0 = no limit.
    pub max_deliveries: u64,
    /// The 4xx statuses that concern the ticket itself and dead-letter it as `rejected`;
    /// any other 4xx is a plugin-wide refusal and leaves the ticket pending.
    pub dead_letter_statuses: Vec<u16>,
    /// Rounds of MAX_RETRIES attempts a ticket may fail alone before it is
    /// dead-lettered as `failing_alone`; 0 = never (see [`crate::retry::GiveUp`]).
    pub give_up_after_parks: u32,
    /// The lease that makes one instance per group the active one (see
    /// [`crate::lease`]).
    pub lease: Duration,
    /// Consumers of the group with nothing pending, idle this long, are deleted.
    pub forget_consumers_after: Duration,
    /// Extra roots for the plugin's certificate (`PAHEKO_PLUGIN_CA_FILE`).
    pub plugin_ca: Option<CaFile>,
    /// Extra roots for a `rediss://` server's certificate (`REDIS_CA_FILE`).
    pub redis_ca: Option<CaFile>,
    /// The user and group to run as once the configuration is read, when started as
    /// root (`PAHEKO_PUSH_RUN_AS`, set by the container image; see
    /// [`crate::privileges`]).
    pub run_as: Option<(u32, u32)>,
    /// The file the variables came from, if any.
    pub source: Source,
    /// Where events go (`PAHEKO_PUSH_TARGET`): the plugin, or Paheko's own API. In API
    /// mode [`Config::plugin`] holds `PAHEKO_URL` and the API password as its secret, so
    /// that what applies to a destination (configured or not, the secret redacted, the
    /// TLS check) applies unchanged.
    pub target: Target,
}

/// `PAHEKO_PUSH_TARGET`: the plugin contract (the default), or direct booking through
/// Paheko's REST API (issue 16 §2, docs/paheko-api.md).
#[derive(Debug, Clone)]
pub enum Target {
    Plugin,
    PahekoApi(std::sync::Arc<PahekoApi>),
}

/// The API mode's settings: the booking rule's accounts and time zone, and Paheko's
/// API credentials (absent while a variable is missing: nothing is delivered then).
#[derive(Clone)]
pub struct PahekoApi {
    /// `PAHEKO_URL` without its trailing slash; `/api/…` is appended.
    pub url: String,
    pub user: String,
    pub password: String,
    pub accounts: crate::booking::Accounts,
    pub zone: crate::booking::TimeZone,
}

impl fmt::Debug for PahekoApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PahekoApi")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &"[redacted]")
            .field("accounts", &self.accounts)
            .field("zone", &self.zone.name)
            .finish()
    }
}

/// Which variable is missing for the worker to deliver anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(pub &'static str);

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not set", self.0)
    }
}

impl Config {
    pub fn from_raw(raw: Raw) -> Result<Config, ConfigError> {
        let stream = text(raw.redis_stream_push_caisse, DEFAULT_STREAM);
        let allow_http = boolean("PAHEKO_PUSH_ALLOW_HTTP", raw.paheko_push_allow_http, false)?;
        let retry = RetryConfig {
            max_attempts: number(
                "PAHEKO_PUSH_MAX_RETRIES",
                raw.paheko_push_max_retries,
                5,
                1..=1000,
            )?,
            backoff: seconds(
                "PAHEKO_PUSH_BACKOFF_SECONDS",
                raw.paheko_push_backoff_seconds,
                1.0,
            )?,
            factor: positive(
                "PAHEKO_PUSH_BACKOFF_FACTOR",
                raw.paheko_push_backoff_factor,
                2.0,
            )?,
            max_backoff: seconds(
                "PAHEKO_PUSH_MAX_BACKOFF_SECONDS",
                raw.paheko_push_max_backoff_seconds,
                300.0,
            )?,
        };
        let timeout = seconds(
            "PAHEKO_PUSH_TIMEOUT_SECONDS",
            raw.paheko_push_timeout_seconds,
            30.0,
        )?;
        let claim_idle = seconds(
            "PAHEKO_PUSH_CLAIM_IDLE_SECONDS",
            raw.paheko_push_claim_idle_seconds,
            60.0,
        )?;
        if timeout.is_zero() {
            return Err(err(
                "PAHEKO_PUSH_TIMEOUT_SECONDS",
                "expected a number of seconds above 0",
            ));
        }
        if claim_idle <= timeout {
            return Err(err(
                "PAHEKO_PUSH_CLAIM_IDLE_SECONDS",
                format!(
                    "must be longer than PAHEKO_PUSH_TIMEOUT_SECONDS ({}s), so that a request \
                     still running is never taken over",
                    timeout.as_secs_f64()
                ),
            ));
        }
        let order_keys: Vec<String> =
            text(raw.paheko_push_order_keys, "cash_session_id,session_id")
                .split(',')
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect();
        let health_addr = match raw.paheko_push_health_addr {
            None => Some(DEFAULT_HEALTH_ADDR.to_string()),
            Some(a) if a.trim().is_empty() => None,
            Some(a) => {
                let a = a.trim().to_string();
                if a.parse::<std::net::SocketAddr>().is_err() {
                    return Err(err(
                        "PAHEKO_PUSH_HEALTH_ADDR",
                        format!(
                            "expected an address such as 127.0.0.1:9187, or empty to disable, got {a:?}"
                        ),
                    ));
                }
                Some(a)
            }
        };
        // With signatures alone the secret never travels, so plain http:// gives away
        // no credential and is allowed without PAHEKO_PUSH_ALLOW_HTTP; what it does
        // give away is said at start-up and by `check` (see [`Config::warnings`]).
        let signature_only = raw
            .paheko_push_auth
            .as_deref()
            .is_some_and(|a| a.trim().eq_ignore_ascii_case("signature"));
        let mut plugin = plugin(
            raw.paheko_plugin_url,
            raw.paheko_plugin_secret,
            raw.paheko_plugin_secret_file,
            allow_http || signature_only,
        )?;
        let allow_http = allow_http
            || (signature_only
                && plugin
                    .as_ref()
                    .is_ok_and(|p| p.url.to_ascii_lowercase().starts_with("http://")));
        let auth = auth(
            raw.paheko_push_auth,
            plugin.as_ref().ok().map(|p| p.secret.as_str()),
        )?;
        let plugin_ca = ca_file("PAHEKO_PLUGIN_CA_FILE", raw.paheko_plugin_ca_file)?;
        let redis_ca = ca_file("REDIS_CA_FILE", raw.redis_ca_file)?;
        if let Ok(p) = &mut plugin {
            p.auth = auth;
            if plugin_ca.is_some() && !p.url.to_ascii_lowercase().starts_with("https://") {
                return Err(err(
                    "PAHEKO_PLUGIN_CA_FILE",
                    "only applies to an https:// PAHEKO_PLUGIN_URL",
                ));
            }
        }
        let dead_letter_statuses = statuses(
            "PAHEKO_PUSH_DEAD_LETTER_STATUSES",
            raw.paheko_push_dead_letter_statuses,
        )?;
        let accounts = crate::booking::Accounts {
            methods: crate::booking::parse_methods(&text(
                raw.paheko_push_payment_accounts,
                crate::booking::DEFAULT_PAYMENT_ACCOUNTS,
            ))
            .map_err(|e| err("PAHEKO_PUSH_PAYMENT_ACCOUNTS", e))?,
            sales: account(
                "PAHEKO_PUSH_SALES_ACCOUNT",
                raw.paheko_push_sales_account,
                "707",
            )?,
            shortage: account(
                "PAHEKO_PUSH_CASH_SHORTAGE_ACCOUNT",
                raw.paheko_push_cash_shortage_account,
                "658",
            )?,
            surplus: account(
                "PAHEKO_PUSH_CASH_SURPLUS_ACCOUNT",
                raw.paheko_push_cash_surplus_account,
                "758",
            )?,
        };
        let zone = crate::booking::TimeZone::named(&text(
            raw.paheko_push_timezone,
            crate::booking::DEFAULT_TIMEZONE,
        ))
        .map_err(|e| err("PAHEKO_PUSH_TIMEZONE", e))?;
        let target = match raw
            .paheko_push_target
            .as_deref()
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("") | Some("plugin") => Target::Plugin,
            Some("paheko-api") => {
                if !dead_letter_statuses.contains(&crate::paheko_api::HELD_STATUS) {
                    return Err(err(
                        "PAHEKO_PUSH_DEAD_LETTER_STATUSES",
                        format!(
                            "must include {} with PAHEKO_PUSH_TARGET=paheko-api: a held session \
                             or ticket is reported with that status and dead-lettered",
                            crate::paheko_api::HELD_STATUS
                        ),
                    ));
                }
                let api = paheko_api(
                    raw.paheko_url,
                    raw.paheko_api_user,
                    raw.paheko_api_password,
                    raw.paheko_api_password_file,
                    allow_http,
                    accounts,
                    zone,
                )?;
                plugin = api
                    .as_ref()
                    .map(|api| Plugin {
                        url: api.url.clone(),
                        secret: api.password.clone(),
                        auth: Auth::Header,
                    })
                    .map_err(Clone::clone);
                match api {
                    Ok(api) => Target::PahekoApi(std::sync::Arc::new(api)),
                    Err(_) => Target::Plugin,
                }
            }
            Some(_) => {
                return Err(err(
                    "PAHEKO_PUSH_TARGET",
                    format!(
                        "expected plugin or paheko-api, got {:?}",
                        raw.paheko_push_target.unwrap_or_default()
                    ),
                ));
            }
        };
        let dead_letter_stream = text(
            raw.paheko_push_dead_letter_stream,
            &format!("{stream}:dead"),
        );
        if dead_letter_stream == stream {
            // A dead letter would be read back as a new ticket, refused again, and so on
            // (one ticket sent 667 times in 5 s: issue 13, 12).
            return Err(err(
                "PAHEKO_PUSH_DEAD_LETTER_STREAM",
                format!(
                    "must differ from the stream it collects from ({stream:?}); leave it unset for {stream}:dead"
                ),
            ));
        }
        let redis_url = redis_url(raw.redis_url)?;
        if redis_ca.is_some() && !redis_url.starts_with("rediss://") {
            return Err(err(
                "REDIS_CA_FILE",
                format!(
                    "only applies to a rediss:// REDIS_URL, got {:?}",
                    redact_url(&redis_url)
                ),
            ));
        }
        Ok(Config {
            redis_url,
            dead_letter_stream,
            stream,
            group: text(raw.paheko_push_group, DEFAULT_GROUP),
            consumer: match raw.paheko_push_consumer {
                Some(c) if !c.trim().is_empty() => c.trim().to_string(),
                _ => host_name(),
            },
            plugin,
            retry,
            concurrency: number(
                "PAHEKO_PUSH_CONCURRENCY",
                raw.paheko_push_concurrency,
                4,
                1..=256,
            )?,
            timeout,
            claim_idle,
            order_keys,
            allow_http,
            health_addr,
            log_level: log_level(raw.paheko_push_log)?,
            log_format: match raw.paheko_push_log_format.as_deref().map(str::trim) {
                None | Some("") | Some("json") => LogFormat::Json,
                Some("text") => LogFormat::Text,
                Some(other) => {
                    return Err(err(
                        "PAHEKO_PUSH_LOG_FORMAT",
                        format!("expected json or text, got {other:?}"),
                    ));
                }
            },
            backlog_warn: number(
                "PAHEKO_PUSH_BACKLOG_WARN",
                raw.paheko_push_backlog_warn,
                8000,
                1..=u64::MAX,
            )?,
            breaker_threshold: number(
                "PAHEKO_PUSH_BREAKER_THRESHOLD",
                raw.paheko_push_breaker_threshold,
                5,
                0..=1_000_000,
            )?,
            max_deliveries: number(
                "PAHEKO_PUSH_MAX_DELIVERIES",
                raw.paheko_push_max_deliveries,
                0,
                0..=u64::MAX,
            )?,
            dead_letter_statuses,
            give_up_after_parks: number(
                "PAHEKO_PUSH_GIVE_UP_AFTER_PARKS",
                raw.paheko_push_give_up_after_parks,
                3,
                0..=1_000_000,
            )?,
            lease: at_least(
                "PAHEKO_PUSH_LEASE_SECONDS",
                seconds(
                    "PAHEKO_PUSH_LEASE_SECONDS",
                    raw.paheko_push_lease_seconds,
                    15.0,
                )?,
                Duration::from_secs(1),
            )?,
            forget_consumers_after: at_least(
                "PAHEKO_PUSH_FORGET_CONSUMERS_AFTER_SECONDS",
                seconds(
                    "PAHEKO_PUSH_FORGET_CONSUMERS_AFTER_SECONDS",
                    raw.paheko_push_forget_consumers_after_seconds,
                    86_400.0,
                )?,
                Duration::from_secs(1),
            )?,
            plugin_ca,
            redis_ca,
            run_as: run_as(raw.paheko_push_run_as)?,
            source: raw.source,
            target,
        })
    }

    /// The stream, group, consumer and dead-letter stream, as every Redis call names them.
    pub fn names(&self) -> crate::store::Names {
        crate::store::Names {
            stream: self.stream.clone(),
            group: self.group.clone(),
            consumer: self.consumer.clone(),
            dead_letters: self.dead_letter_stream.clone(),
        }
    }

    /// What the operator should know about a configuration that works: logged at
    /// warn level at start-up, shown as `warn` lines by `check`.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Ok(p) = &self.plugin
            && p.url.to_ascii_lowercase().starts_with("http://")
            && !p.auth.sends_secret()
        {
            warnings.push(format!(
                "{} is plain http://: the secret never travels (PAHEKO_PUSH_AUTH=signature), \
                 but every ticket does, readable by anyone on the path, and a captured \
                 request is accepted again if replayed within the signature's 5-minute \
                 tolerance (unless the plugin drops a repeated Idempotency-Key, as it should); \
                 use https:// unless the plugin is on this host or its private network",
                redact_url(&p.url)
            ));
        }
        warnings
    }

    /// The strings that must never be printed: the plugin secret and the Redis password.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        if let Ok(plugin) = &self.plugin {
            secrets.push(plugin.secret.clone());
            secrets.extend(url_secrets(&plugin.url));
        }
        if let Some(password) = url_password(&self.redis_url) {
            secrets.push(password.to_string());
        }
        secrets.retain(|s| !s.is_empty());
        secrets.dedup();
        secrets
    }
}

/// Shows the Redis URL without its password and the plugin without its secret.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("plugin", &self.plugin)
            .field("retry", &self.retry)
            .field("concurrency", &self.concurrency)
            .field("timeout", &self.timeout)
            .field("claim_idle", &self.claim_idle)
            .field("order_keys", &self.order_keys)
            .field("dead_letter_stream", &self.dead_letter_stream)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

fn err(var: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        var: var.to_string(),
        problem: problem.into(),
    }
}

fn text(value: Option<String>, default: &str) -> String {
    match value {
        Some(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => default.to_string(),
    }
}

fn at_least(var: &str, value: Duration, min: Duration) -> Result<Duration, ConfigError> {
    if value < min {
        return Err(err(
            var,
            format!(
                "expected at least {} s, got {} s",
                min.as_secs_f64(),
                value.as_secs_f64()
            ),
        ));
    }
    Ok(value)
}

/// A comma list of 4xx statuses (408 and 429 excepted: those always mean "try again").
fn statuses(var: &str, value: Option<String>) -> Result<Vec<u16>, ConfigError> {
    let Some(v) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(crate::retry::DEAD_LETTER_STATUSES.to_vec());
    };
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(408 | 429) => {
                return Err(err(
                    var,
                    format!(
                        "{item} always means \"try again later\"; it cannot dead-letter a ticket"
                    ),
                ));
            }
            Ok(s @ 400..=499) => out.push(s),
            _ => {
                return Err(err(
                    var,
                    format!(
                        "expected a comma list of 4xx statuses such as 400,409,413,415,422, got {item:?}"
                    ),
                ));
            }
        }
    }
    // "," named no status: every 4xx would then mean "the plugin refuses everything",
    // and one bad ticket would block the rest (issue 13, 5). Unset means the default.
    if out.is_empty() {
        return Err(err(
            var,
            format!(
                "lists no status (got {v:?}); leave it unset for the default {}",
                crate::retry::DEAD_LETTER_STATUSES
                    .map(|s| s.to_string())
                    .join(",")
            ),
        ));
    }
    Ok(out)
}

fn number<T>(
    var: &str,
    value: Option<String>,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(v) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(default);
    };
    match v.trim().parse::<T>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(err(
            var,
            format!(
                "expected a whole number from {} to {}, got {v:?}",
                range.start(),
                range.end()
            ),
        )),
    }
}

fn float(
    var: &str,
    value: Option<String>,
    default: f64,
    accepts: &str,
    ok: impl Fn(f64) -> bool,
) -> Result<f64, ConfigError> {
    let Some(v) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(default);
    };
    match v.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && ok(n) => Ok(n),
        _ => Err(err(var, format!("expected {accepts}, got {v:?}"))),
    }
}

fn seconds(var: &str, value: Option<String>, default: f64) -> Result<Duration, ConfigError> {
    let s = float(
        var,
        value,
        default,
        "a number of seconds, 0 or more (such as 1.5)",
        |n| (0.0..=86_400.0 * 365.0).contains(&n),
    )?;
    Ok(Duration::from_secs_f64(s))
}

fn positive(var: &str, value: Option<String>, default: f64) -> Result<f64, ConfigError> {
    float(var, value, default, "a number above 0 (such as 2.0)", |n| {
        n > 0.0 && n <= 1000.0
    })
}

fn boolean(var: &str, value: Option<String>, default: bool) -> Result<bool, ConfigError> {
    match value
        .as_deref()
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") => Ok(default),
        Some("1" | "true" | "yes" | "on") => Ok(true),
        Some("0" | "false" | "no" | "off") => Ok(false),
        Some(_) => Err(err(
            var,
            format!(
                "expected true or false, got {:?}",
                value.unwrap_or_default()
            ),
        )),
    }
}

fn log_level(value: Option<String>) -> Result<log::LevelFilter, ConfigError> {
    match value
        .as_deref()
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") => Ok(log::LevelFilter::Info),
        Some(v) => match v {
            "error" => Ok(log::LevelFilter::Error),
            "warn" => Ok(log::LevelFilter::Warn),
            "info" => Ok(log::LevelFilter::Info),
            "debug" => Ok(log::LevelFilter::Debug),
            "trace" => Ok(log::LevelFilter::Trace),
            _ => Err(err(
                "PAHEKO_PUSH_LOG",
                format!("expected error, warn, info, debug or trace, got {v:?}"),
            )),
        },
    }
}

/// `UID:GID`, numbers: the image has no user database worth the name.
fn run_as(value: Option<String>) -> Result<Option<(u32, u32)>, ConfigError> {
    let Some(v) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    let parsed = v
        .trim()
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)));
    match parsed {
        Some((0, _) | (_, 0)) | None => Err(err(
            "PAHEKO_PUSH_RUN_AS",
            format!("expected UID:GID, numbers other than 0, such as 65532:65532, got {v:?}"),
        )),
        Some(ids) => Ok(Some(ids)),
    }
}

fn redis_url(value: Option<String>) -> Result<String, ConfigError> {
    let url = text(value, DEFAULT_REDIS_URL);
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("redis" | "rediss" | "unix" | "redis+unix") => Ok(url),
        _ => Err(err(
            "REDIS_URL",
            format!(
                "expected a redis://, rediss:// or redis+unix:// URL, got {:?}",
                redact_url(&url)
            ),
        )),
    }
}

fn plugin(
    url: Option<String>,
    secret: Option<String>,
    secret_file: Option<String>,
    allow_http: bool,
) -> Result<Result<Plugin, Missing>, ConfigError> {
    let url = url.map(|u| u.trim().to_string()).filter(|u| !u.is_empty());
    if let Some(url) = &url {
        let lower = url.to_ascii_lowercase();
        let host = url_host(&lower);
        match host {
            None | Some("") => {
                return Err(err(
                    "PAHEKO_PLUGIN_URL",
                    format!(
                        "expected an https:// URL with a host, got {:?}",
                        redact_url(url)
                    ),
                ));
            }
            Some(_) if lower.starts_with("http://") && !allow_http => {
                return Err(err(
                    "PAHEKO_PLUGIN_URL",
                    "plain http:// would send the secret in clear (PAHEKO_PUSH_AUTH=header \
                     or both); use https://, or PAHEKO_PUSH_AUTH=signature, or set \
                     PAHEKO_PUSH_ALLOW_HTTP=true for a plugin on the same host",
                ));
            }
            Some(_) => {}
        }
    }
    let secret = secret_value(
        "PAHEKO_PLUGIN_SECRET",
        "PAHEKO_PLUGIN_SECRET_FILE",
        secret,
        secret_file,
    )?;
    if let Some(s) = &secret
        && s.bytes().any(|b| b < 0x20 || b == 0x7f)
    {
        return Err(err(
            "PAHEKO_PLUGIN_SECRET",
            "contains a control character, which no HTTP header can carry",
        ));
    }
    Ok(match (url, secret) {
        (None, _) => Err(Missing("PAHEKO_PLUGIN_URL")),
        (_, None) => Err(Missing("PAHEKO_PLUGIN_SECRET")),
        (Some(url), Some(secret)) => Ok(Plugin {
            url,
            secret,
            auth: Auth::Header,
        }),
    })
}

/// An account code variable (`PAHEKO_PUSH_SALES_ACCOUNT`…).
fn account(var: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    let code = text(value, default);
    if !crate::booking::is_account_code(&code) {
        return Err(err(
            var,
            format!(
                "expected an account code of letters and digits such as {default}, got {code:?}"
            ),
        ));
    }
    Ok(code)
}

/// The API mode's settings; `Missing` names the first variable not set.
fn paheko_api(
    url: Option<String>,
    user: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
    allow_http: bool,
    accounts: crate::booking::Accounts,
    zone: crate::booking::TimeZone,
) -> Result<Result<PahekoApi, Missing>, ConfigError> {
    let url = url
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty());
    if let Some(url) = &url {
        let lower = url.to_ascii_lowercase();
        let host = url_host(&lower);
        match host {
            None | Some("") => {
                return Err(err(
                    "PAHEKO_URL",
                    format!(
                        "expected Paheko's https:// address such as https://paheko.example.org, got {:?}",
                        redact_url(url)
                    ),
                ));
            }
            _ if url.contains(['?', '#']) || url.contains('@') => {
                return Err(err(
                    "PAHEKO_URL",
                    "expected Paheko's address alone (credentials go in PAHEKO_API_USER and \
                     PAHEKO_API_PASSWORD)",
                ));
            }
            Some(_) if lower.starts_with("http://") && !allow_http => {
                return Err(err(
                    "PAHEKO_URL",
                    "plain http:// would send the API password in clear; use https://, or set \
                     PAHEKO_PUSH_ALLOW_HTTP=true for a Paheko on the same host",
                ));
            }
            Some(_) => {}
        }
    }
    let user = user.map(|u| u.trim().to_string()).filter(|u| !u.is_empty());
    if user
        .as_deref()
        .is_some_and(|u| u.contains(':') || u.bytes().any(|b| b < 0x20))
    {
        return Err(err(
            "PAHEKO_API_USER",
            "cannot contain a colon or a control character (HTTP Basic)",
        ));
    }
    let password = secret_value(
        "PAHEKO_API_PASSWORD",
        "PAHEKO_API_PASSWORD_FILE",
        password,
        password_file,
    )?;
    Ok(match (url, user, password) {
        (None, _, _) => Err(Missing("PAHEKO_URL")),
        (_, None, _) => Err(Missing("PAHEKO_API_USER")),
        (_, _, None) => Err(Missing("PAHEKO_API_PASSWORD")),
        (Some(url), Some(user), Some(password)) => Ok(PahekoApi {
            url,
            user,
            password,
            accounts,
            zone,
        }),
    })
}

/// The host of an http(s) URL (lowercased by the caller), `None` for another scheme.
fn url_host(lower: &str) -> Option<&str> {
    lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
        .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(""))
}

/// A secret from its variable or from the file its `_FILE` variable names (trailing
/// newlines dropped), never both; `None` when neither is set.
fn secret_value(
    var: &str,
    file_var: &str,
    value: Option<String>,
    file: Option<String>,
) -> Result<Option<String>, ConfigError> {
    match (
        value.filter(|s| !s.is_empty()),
        file.filter(|f| !f.trim().is_empty()),
    ) {
        (Some(_), Some(_)) => Err(err(
            file_var,
            format!("set either {var} or {file_var}, not both"),
        )),
        (Some(s), None) => Ok(Some(s)),
        (None, Some(path)) => {
            let mut s = std::fs::read_to_string(path.trim()).map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                    crate::privileges::unreadable_hint()
                } else {
                    String::new()
                };
                err(
                    file_var,
                    format!("cannot read {:?}: {e}{hint}", path.trim()),
                )
            })?;
            while s.ends_with('\n') || s.ends_with('\r') {
                s.pop();
            }
            if s.is_empty() {
                return Err(err(file_var, format!("{:?} is empty", path.trim())));
            }
            Ok(Some(s))
        }
        (None, None) => Ok(None),
    }
}

/// `PAHEKO_PUSH_AUTH` applied to the secret: for `signature` and `both`, a `whsec_`
/// secret is base64-decoded into the key. The message never shows the secret.
fn auth(value: Option<String>, secret: Option<&str>) -> Result<Auth, ConfigError> {
    let mode = value.as_deref().map(|v| v.trim().to_ascii_lowercase());
    let key = || match secret {
        None => Ok(Vec::new()),
        Some(s) => crate::sign::key_from_secret(s).map_err(|e| {
            err(
                "PAHEKO_PLUGIN_SECRET",
                format!("{e} (PAHEKO_PUSH_AUTH={})", mode.as_deref().unwrap_or("")),
            )
        }),
    };
    match mode.as_deref() {
        None | Some("") | Some("header") => Ok(Auth::Header),
        Some("signature") => Ok(Auth::Signature { key: key()? }),
        Some("both") => Ok(Auth::Both { key: key()? }),
        Some(_) => Err(err(
            "PAHEKO_PUSH_AUTH",
            format!(
                "expected header, signature or both, got {:?}",
                value.unwrap_or_default()
            ),
        )),
    }
}

/// Reads a PEM bundle of certificate authorities; `None` when the variable is unset.
fn ca_file(var: &str, value: Option<String>) -> Result<Option<CaFile>, ConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let Some(path) = value
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
    else {
        return Ok(None);
    };
    let pem = std::fs::read(&path).map_err(|e| err(var, format!("cannot read {path:?}: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(var, format!("{path:?} is not a valid PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            var,
            format!("{path:?} holds no certificate (expected -----BEGIN CERTIFICATE----- blocks)"),
        ));
    }
    Ok(Some(CaFile { path, pem, certs }))
}

/// The machine's host name: a consumer name that stays the same across restarts.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "paheko-push".to_string())
}

/// The password part of a URL's user info (`scheme://user:password@host`), or of a
/// `?pass=`/`?password=` query parameter.
pub fn url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
    {
        return Some(password);
    }
    let query = url.split_once('?')?.1;
    query
        .split('&')
        .find_map(|pair| match pair.split_once('=') {
            Some(("pass" | "password", v)) => Some(v),
            _ => None,
        })
}

/// The URL as every message, log line and check shows it (issue 14 §7): the password of
/// its user info and the value of every query parameter replaced by `***`
/// (`https://bob:***@host/p?token=***`). A query value is as likely a secret as a
/// password (`?token=…`, `?key=…`), and the URL's owner is better placed than this
/// function to tell which is not. The one function for Redis's and the plugin's URLs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (before_fragment, fragment) = match rest.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (rest, None),
    };
    let (before_query, query) = match before_fragment.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (before_fragment, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(at) => before_query.split_at(at),
        None => (before_query, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, password)) if !password.is_empty() => format!("{user}:***@{host}"),
            _ => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let mut out = format!("{scheme}://{authority}{path}");
    if let Some(query) = query {
        let masked: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, value)) if !value.is_empty() => format!("{name}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&masked.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

/// The parts of the plugin's URL that [`redact_url`] hides and that are long enough to
/// be recognised in a library's log line: its password and its query values. A value
/// shorter than 8 characters (`?db=0`, `?v=2`) is masked where the URL is printed, but
/// replacing every occurrence of it in a log would blank out unrelated text.
fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets: Vec<String> = url_password(url).map(str::to_string).into_iter().collect();
    if let Some((_, query)) = url.split('#').next().unwrap_or("").split_once('?') {
        secrets.extend(
            query
                .split('&')
                .filter_map(|pair| pair.split_once('=').map(|(_, v)| v))
                .filter(|v| v.len() >= 8)
                .map(str::to_string),
        );
    }
    secrets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_raw(Raw::from_vars(vars)?)
    }

    #[test]
    fn settings_that_would_loop_on_one_ticket_are_refused() {
        // issue 13, 12: dead letters written to the stream they come from.
        let e = config(&[
            ("REDIS_STREAM_PUSH_CAISSE", "shop:caisse"),
            ("PAHEKO_PUSH_DEAD_LETTER_STREAM", "shop:caisse"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "PAHEKO_PUSH_DEAD_LETTER_STREAM");
        assert!(e.problem.contains("must differ"), "{e}");
        // issue 13, 5: a list naming no status.
        for empty in [",", " , ,"] {
            let e = config(&[("PAHEKO_PUSH_DEAD_LETTER_STATUSES", empty)]).unwrap_err();
            assert_eq!(e.var, "PAHEKO_PUSH_DEAD_LETTER_STATUSES");
            assert!(e.problem.contains("lists no status"), "{e}");
        }
        let c = config(&[("PAHEKO_PUSH_DEAD_LETTER_STATUSES", "")]).unwrap();
        assert_eq!(c.dead_letter_statuses, crate::retry::DEAD_LETTER_STATUSES);
    }

    #[test]
    fn defaults_match_the_python_worker() {
        let c = config(&[]).unwrap();
        assert_eq!(
            (c.backlog_warn, c.breaker_threshold, c.max_deliveries),
            (8000, 5, 0)
        );
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379/0");
        assert_eq!(c.stream, "recyclic:push:caisse");
        assert_eq!(c.group, "recyclic-push");
        assert_eq!(c.dead_letter_stream, "recyclic:push:caisse:dead");
        assert_eq!(c.retry.max_attempts, 5);
        assert_eq!(c.retry.backoff, Duration::from_secs(1));
        assert_eq!(c.retry.factor, 2.0);
        assert_eq!(c.concurrency, 4);
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.claim_idle, Duration::from_secs(60));
        assert_eq!(c.order_keys, ["cash_session_id", "session_id"]);
        assert_eq!(
            c.plugin.as_ref().unwrap_err(),
            &Missing("PAHEKO_PLUGIN_URL")
        );
        assert_eq!(c.health_addr.as_deref(), Some(DEFAULT_HEALTH_ADDR));
        assert!(!c.consumer.is_empty());
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value, says) in [
            ("PAHEKO_PUSH_MAX_RETRIES", "abc", "whole number"),
            ("PAHEKO_PUSH_MAX_RETRIES", "0", "whole number from 1"),
            ("PAHEKO_PUSH_BACKOFF_FACTOR", "-1", "above 0"),
            ("PAHEKO_PUSH_BACKOFF_FACTOR", "0", "above 0"),
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "soon", "seconds"),
            ("PAHEKO_PUSH_CONCURRENCY", "0", "whole number"),
            ("PAHEKO_PUSH_ALLOW_HTTP", "maybe", "true or false"),
            ("PAHEKO_PUSH_LOG", "loud", "error, warn"),
            ("PAHEKO_PUSH_LOG_FORMAT", "xml", "json or text"),
            ("PAHEKO_PUSH_HEALTH_ADDR", "localhost", "address"),
            ("PAHEKO_PLUGIN_URL", "ftp://paheko.example/push", "https://"),
            (
                "PAHEKO_PLUGIN_URL",
                "http://paheko.example/push",
                "PAHEKO_PUSH_ALLOW_HTTP",
            ),
            ("REDIS_URL", "mysql://x", "redis://"),
            ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "10", "longer than"),
        ] {
            let e = config(&[(var, value)]).unwrap_err();
            assert_eq!(e.var, var, "{var}={value}");
            assert!(e.to_string().contains(says), "{var}={value}: {e}");
        }
    }

    #[test]
    fn plugin_needs_url_and_secret() {
        let c = config(&[("PAHEKO_PLUGIN_URL", "https://paheko.example/p")]).unwrap();
        assert_eq!(c.plugin.unwrap_err(), Missing("PAHEKO_PLUGIN_SECRET"));
        let c = config(&[
            ("PAHEKO_PLUGIN_URL", "https://paheko.example/p"),
            ("PAHEKO_PLUGIN_SECRET", "k"),
        ])
        .unwrap();
        assert_eq!(c.plugin.unwrap().secret, "k");
        let c = config(&[
            ("PAHEKO_PLUGIN_URL", "http://127.0.0.1:8080/p"),
            ("PAHEKO_PLUGIN_SECRET", "k"),
            ("PAHEKO_PUSH_ALLOW_HTTP", "true"),
        ])
        .unwrap();
        assert_eq!(c.plugin.unwrap().url, "http://127.0.0.1:8080/p");
    }

    #[test]
    fn secret_file_loses_its_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("paheko-push-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let c = config(&[
            ("PAHEKO_PLUGIN_URL", "https://paheko.example/p"),
            ("PAHEKO_PLUGIN_SECRET_FILE", file.to_str().unwrap()),
        ])
        .unwrap();
        assert_eq!(c.plugin.unwrap().secret, "from-file");
        let e = config(&[("PAHEKO_PLUGIN_SECRET_FILE", "/nonexistent/secret")]).unwrap_err();
        assert_eq!(e.var, "PAHEKO_PLUGIN_SECRET_FILE");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn empty_health_addr_disables_the_server() {
        assert_eq!(
            config(&[("PAHEKO_PUSH_HEALTH_ADDR", "")])
                .unwrap()
                .health_addr,
            None
        );
    }

    #[test]
    fn dotenv_lines() {
        let vars = parse_dotenv(
            "# comment\n\nexport A=1\nB = \"two words\"\nC='x=y'\n  # indented comment\n",
        )
        .unwrap();
        assert_eq!(
            vars,
            [
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "x=y".into())
            ]
        );
    }

    /// As docker compose and python-dotenv read RecyClique's `.env` (issue 8 §7).
    #[test]
    fn dotenv_as_compose_reads_it() {
        let read = |text: &str| parse_dotenv(text).unwrap();
        let one = |text: &str| {
            let vars = read(text);
            assert_eq!(vars.len(), 1, "{text:?}: {vars:?}");
            vars[0].1.clone()
        };
        assert_eq!(
            one("REDIS_URL=redis://redis:6379/0  # internal"),
            "redis://redis:6379/0"
        );
        assert_eq!(
            one("REDIS_URL=redis://redis:6379/0\t# tab"),
            "redis://redis:6379/0"
        );
        // No space before the #: part of the value, as compose reads it.
        assert_eq!(one("A=abc#def"), "abc#def");
        assert_eq!(one("A=\"has # hash\"  # comment"), "has # hash");
        assert_eq!(one("A='has # hash'"), "has # hash");
        assert_eq!(one(r#"A="say \"hi\" \\ \$HOME""#), r#"say "hi" \ $HOME"#);
        assert_eq!(one(r#"A="two\nlines""#), "two\nlines");
        assert_eq!(one(r#"A='no \n escape'"#), r"no \n escape");
        assert_eq!(one("A=\"over\ntwo lines\""), "over\ntwo lines");
        assert_eq!(one("export A=1"), "1");
        assert_eq!(one("A="), "");
        assert_eq!(one("A=  # only a comment"), "");
        assert_eq!(one("\u{feff}A=bom"), "bom");
        assert_eq!(
            read("A=one\nB=${A}-two\n"),
            [("A".into(), "one".into()), ("B".into(), "one-two".into())]
        );
    }

    #[test]
    fn a_bad_dotenv_line_is_named_without_its_value() {
        for (text, line) in [
            ("A=1\n# c\n\nSECRET=two hunter2words\n", "line 4 (SECRET)"),
            ("A=1\nexport SECRET=\"hunter2 unclosed\n", "line 2 (SECRET)"),
            ("A=1\nSECRET hunter2\n", "line 2 (SECRET)"),
            ("SECRET=\"\\thunter2\"\n", "line 1 (SECRET)"),
        ] {
            let e = parse_dotenv(text).unwrap_err();
            assert_eq!(e.var, ".env", "{text:?}");
            assert!(e.problem.starts_with(line), "{text:?}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{text:?}: {e}");
        }
    }

    #[test]
    fn passwords_are_found_and_redacted() {
        assert_eq!(url_password("redis://user:pw@host:6379/0"), Some("pw"));
        assert_eq!(url_password("redis+unix:///tmp/r.sock?pass=pw"), Some("pw"));
        assert_eq!(url_password("redis://host:6379/0"), None);
        assert_eq!(redact_url("rediss://:hunter2@h/0"), "rediss://:***@h/0");
        let c = config(&[
            ("REDIS_URL", "redis://u:pw@h/0"),
            ("PAHEKO_PLUGIN_URL", "https://p/x"),
            ("PAHEKO_PLUGIN_SECRET", "k"),
        ])
        .unwrap();
        assert_eq!(c.secrets(), ["k", "pw"]);
        let shown = format!("{c:?}");
        assert!(!shown.contains("\"k\"") && !shown.contains("pw"), "{shown}");
    }

    /// Issue 14 §7: the plugin's URL was printed with its password and token.
    #[test]
    fn every_url_is_masked_the_same_way() {
        for (url, shown) in [
            (
                "https://bob:pluginpw@paheko.example/p?token=abc123&x=1",
                "https://bob:***@paheko.example/p?token=***&x=***",
            ),
            (
                "https://paheko.example/p/recyclique/",
                "https://paheko.example/p/recyclique/",
            ),
            ("https://bob@h/p?flag", "https://bob@h/p?flag"),
            ("https://h?key=v#frag", "https://h?key=***#frag"),
            ("redis://u:pw@h:6379/0", "redis://u:***@h:6379/0"),
            ("rediss://:hunter2@h/0", "rediss://:***@h/0"),
            (
                "redis+unix:///tmp/r.sock?pass=pw&db=2",
                "redis+unix:///tmp/r.sock?pass=***&db=***",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        let c = config(&[
            (
                "PAHEKO_PLUGIN_URL",
                "https://bob:pluginpw@p/x?token=t0k3n-long-enough&v=2",
            ),
            ("PAHEKO_PLUGIN_SECRET", "k"),
        ])
        .unwrap();
        assert_eq!(c.secrets(), ["k", "pluginpw", "t0k3n-long-enough"]);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("pluginpw") && !shown.contains("t0k3n"),
            "{shown}"
        );
    }

    /// Signatures over plain http: allowed, with a warning saying what travels.
    #[test]
    fn signature_over_http_is_allowed_with_a_warning() {
        let vars = |auth: &'static str| {
            [
                ("PAHEKO_PLUGIN_URL", "http://paheko/p/recyclique/"),
                ("PAHEKO_PLUGIN_SECRET", "whsec_AQID"),
                ("PAHEKO_PUSH_AUTH", auth),
            ]
        };
        let c = config(&vars("signature")).unwrap();
        assert!(c.allow_http);
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("the secret never travels")
                && warnings[0].contains("every ticket does")
                && warnings[0].contains("replayed"),
            "{warnings:?}"
        );
        for auth in ["header", "both"] {
            let e = config(&vars(auth)).unwrap_err();
            assert_eq!(e.var, "PAHEKO_PLUGIN_URL");
            assert!(e.problem.contains("would send the secret in clear"), "{e}");
        }
        let https = config(&[
            ("PAHEKO_PLUGIN_URL", "https://paheko/p/recyclique/"),
            ("PAHEKO_PLUGIN_SECRET", "whsec_AQID"),
            ("PAHEKO_PUSH_AUTH", "signature"),
        ])
        .unwrap();
        assert!(!https.allow_http && https.warnings().is_empty());
    }

    #[test]
    fn run_as_takes_two_numbers_other_than_root() {
        assert_eq!(config(&[]).unwrap().run_as, None);
        assert_eq!(
            config(&[("PAHEKO_PUSH_RUN_AS", "65532:65532")])
                .unwrap()
                .run_as,
            Some((65532, 65532))
        );
        for bad in ["65532", "0:0", "nobody:nogroup", "1:0"] {
            let e = config(&[("PAHEKO_PUSH_RUN_AS", bad)]).unwrap_err();
            assert_eq!(e.var, "PAHEKO_PUSH_RUN_AS", "{bad}");
        }
    }

    /// Issue 14 §2: which file of variables is read, and the secret beside it.
    #[test]
    fn the_env_file_rule() {
        let dir = tempdir("source");
        let cwd = dir.join("cwd");
        let etc = dir.join("etc");
        std::fs::create_dir_all(&cwd).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        let package = etc.join("paheko-push.env");
        std::fs::write(
            &package,
            "PAHEKO_PUSH_GROUP=from-package\nPAHEKO_PLUGIN_URL=https://p/x\n",
        )
        .unwrap();
        std::fs::write(etc.join("secret"), "package-secret\n").unwrap();
        std::fs::write(
            etc.join("shop.env"),
            "PAHEKO_PUSH_GROUP=from-shop\nPAHEKO_PLUGIN_URL=https://p/x\n",
        )
        .unwrap();
        std::fs::write(etc.join("shop.secret"), "shop-secret").unwrap();
        let read = |env: &[(&str, &str)], package: Option<&Path>| {
            let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
            Config::from_raw(Raw::from_env_vars(env, &cwd, package).unwrap()).unwrap()
        };
        let secret = |c: &Config| c.plugin.as_ref().map(|p| p.secret.clone()).ok();

        // The package's file, and its secret, when nothing else configures.
        let c = read(&[("PATH", "/bin")], Some(&package));
        assert_eq!(c.group, "from-package");
        assert_eq!(secret(&c).as_deref(), Some("package-secret"));
        assert_eq!(
            c.source.to_string(),
            format!(
                "{} and the secret {}",
                package.display(),
                etc.join("secret").display()
            )
        );
        // Not for the worker (no package path given)…
        assert_eq!(read(&[], None).group, DEFAULT_GROUP);
        // …nor when the environment configures anything.
        let c = read(&[("REDIS_URL", "redis://h/0")], Some(&package));
        assert_eq!(
            (c.group.as_str(), c.source.file.clone()),
            (DEFAULT_GROUP, None)
        );
        // PAHEKO_PUSH_ENV_FILE names another, which brings NAME.secret.
        let shop = etc.join("shop.env");
        let c = read(
            &[("PAHEKO_PUSH_ENV_FILE", shop.to_str().unwrap())],
            Some(&package),
        );
        assert_eq!(c.group, "from-shop");
        assert_eq!(secret(&c).as_deref(), Some("shop-secret"));
        // A secret in the environment wins over the paired file.
        let c = read(
            &[
                ("PAHEKO_PUSH_ENV_FILE", shop.to_str().unwrap()),
                ("PAHEKO_PLUGIN_SECRET", "mine"),
            ],
            None,
        );
        assert_eq!(secret(&c).as_deref(), Some("mine"));
        // ./.env comes before the package's file, and brings no secret file.
        std::fs::write(cwd.join(".env"), "PAHEKO_PUSH_GROUP=from-dotenv\n").unwrap();
        let c = read(&[], Some(&package));
        assert_eq!(c.group, "from-dotenv");
        assert_eq!(c.source.secret_file, None);
        // A named file that is not there is an error naming the variable.
        let e = Raw::from_env_vars(
            [(
                "PAHEKO_PUSH_ENV_FILE".to_string(),
                "/nonexistent/x.env".to_string(),
            )],
            &cwd,
            None,
        )
        .unwrap_err();
        assert_eq!(e.var, "PAHEKO_PUSH_ENV_FILE");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir(what: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("paheko-push-config-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn auth_modes_and_whsec_keys() {
        let plugin = |auth: &str, secret: &str| {
            config(&[
                ("PAHEKO_PLUGIN_URL", "https://p/x"),
                ("PAHEKO_PLUGIN_SECRET", secret),
                ("PAHEKO_PUSH_AUTH", auth),
            ])
            .map(|c| c.plugin.unwrap())
        };
        assert_eq!(plugin("", "k").unwrap().auth, Auth::Header);
        assert_eq!(plugin("header", "whsec_!!").unwrap().auth, Auth::Header);
        let signed = plugin("signature", "whsec_AQID").unwrap();
        assert_eq!(signed.auth, Auth::Signature { key: vec![1, 2, 3] });
        assert!(!signed.auth.sends_secret());
        assert_eq!(signed.secret, "whsec_AQID");
        let both = plugin("Both", "plain").unwrap().auth;
        assert_eq!(
            both,
            Auth::Both {
                key: b"plain".to_vec()
            }
        );
        assert!(both.sends_secret() && both.signing_key() == Some(b"plain"));
        let e = plugin("signature", "whsec_not*base64").unwrap_err();
        assert_eq!(e.var, "PAHEKO_PLUGIN_SECRET");
        assert!(e.problem.contains("base64"), "{e}");
        assert!(!e.to_string().contains("not*base64"), "{e}");
        let e = plugin("hmac", "k").unwrap_err();
        assert_eq!(e.var, "PAHEKO_PUSH_AUTH");
        assert!(e.problem.contains("header, signature or both"), "{e}");
        // Checked even while the plugin is not configured.
        assert_eq!(
            config(&[("PAHEKO_PUSH_AUTH", "x")]).unwrap_err().var,
            "PAHEKO_PUSH_AUTH"
        );
    }

    #[test]
    fn paheko_api_mode() {
        let api = [
            ("PAHEKO_PUSH_TARGET", "paheko-api"),
            ("PAHEKO_URL", "https://paheko.example.org/"),
            ("PAHEKO_API_USER", "recyclique"),
            ("PAHEKO_API_PASSWORD", "hunter2-api"),
        ];
        let c = config(&api).unwrap();
        let Target::PahekoApi(settings) = &c.target else {
            panic!("{:?}", c.target)
        };
        assert_eq!(settings.url, "https://paheko.example.org");
        assert_eq!(settings.accounts, crate::booking::Accounts::default());
        assert_eq!(settings.zone.name, "Europe/Paris");
        // The destination the delivery machinery sees; the password is a secret.
        assert_eq!(c.plugin.as_ref().unwrap().url, "https://paheko.example.org");
        assert!(c.secrets().contains(&"hunter2-api".to_string()));
        assert!(!format!("{c:?}").contains("hunter2-api"), "{c:?}");
        // The default stays the plugin.
        assert!(matches!(config(&[]).unwrap().target, Target::Plugin));
        // A missing variable: nothing is delivered, the worker waits.
        let c = config(&api[..3]).unwrap();
        assert_eq!(c.plugin.unwrap_err(), Missing("PAHEKO_API_PASSWORD"));
        let c = config(&[api[0], api[2], api[3]]).unwrap();
        assert_eq!(c.plugin.unwrap_err(), Missing("PAHEKO_URL"));
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut vars: Vec<(&str, &str)> = api
                .iter()
                .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
                .copied()
                .collect();
            vars.extend_from_slice(extra);
            config(&vars)
        };
        let c = with(&[
            ("PAHEKO_PUSH_PAYMENT_ACCOUNTS", "especes:530,bon:4191"),
            ("PAHEKO_PUSH_SALES_ACCOUNT", "7070"),
            ("PAHEKO_PUSH_TIMEZONE", "UTC"),
        ])
        .unwrap();
        let Target::PahekoApi(settings) = &c.target else {
            panic!()
        };
        assert_eq!(settings.accounts.for_method("bon"), Some("4191"));
        assert_eq!(settings.accounts.sales, "7070");
        assert_eq!(settings.zone.offset_at(1_800_000_000), 0);
        for (var, value, says) in [
            ("PAHEKO_PUSH_TARGET", "api", "plugin or paheko-api"),
            ("PAHEKO_URL", "paheko.example.org", "https://"),
            (
                "PAHEKO_URL",
                "http://paheko.example.org",
                "PAHEKO_PUSH_ALLOW_HTTP",
            ),
            ("PAHEKO_URL", "https://u:p@paheko.example.org", "alone"),
            ("PAHEKO_API_USER", "a:b", "colon"),
            (
                "PAHEKO_PUSH_PAYMENT_ACCOUNTS",
                "especes=530",
                "method:account",
            ),
            ("PAHEKO_PUSH_SALES_ACCOUNT", "70 7", "account code"),
            ("PAHEKO_PUSH_CASH_SHORTAGE_ACCOUNT", "-", "account code"),
            ("PAHEKO_PUSH_CASH_SURPLUS_ACCOUNT", "7.58", "account code"),
            ("PAHEKO_PUSH_TIMEZONE", "Mars/Olympus", "tzdata"),
            ("PAHEKO_PUSH_DEAD_LETTER_STATUSES", "400,409", "422"),
        ] {
            let e = with(&[(var, value)]).unwrap_err();
            assert_eq!(e.var, var, "{var}={value}: {e}");
            assert!(e.problem.contains(says), "{var}={value}: {e}");
        }
        let e = with(&[("PAHEKO_API_PASSWORD_FILE", "/nonexistent")]).unwrap_err();
        assert_eq!(e.var, "PAHEKO_API_PASSWORD_FILE");
        assert!(e.problem.contains("not both"), "{e}");
    }

    #[test]
    fn ca_files_are_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("paheko-push-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(
            &good,
            "# private CA\n-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let good = good.to_str().unwrap();
        let c = config(&[
            ("PAHEKO_PLUGIN_URL", "https://p/x"),
            ("PAHEKO_PLUGIN_CA_FILE", good),
            ("REDIS_URL", "rediss://u:pw@h:6380/0"),
            ("REDIS_CA_FILE", good),
        ])
        .unwrap();
        assert_eq!(c.plugin_ca.as_ref().unwrap().certs, [vec![1, 2, 3]]);
        assert_eq!(c.redis_ca.unwrap().path, good);
        assert_eq!(config(&[]).unwrap().plugin_ca, None);
        for (var, value, extra, says) in [
            (
                "PAHEKO_PLUGIN_CA_FILE",
                "/nonexistent/ca.pem",
                None,
                "cannot read",
            ),
            (
                "PAHEKO_PLUGIN_CA_FILE",
                empty.to_str().unwrap(),
                None,
                "no certificate",
            ),
            ("REDIS_CA_FILE", good, None, "rediss://"),
            (
                "PAHEKO_PLUGIN_CA_FILE",
                good,
                Some(("PAHEKO_PLUGIN_URL", "http://127.0.0.1/x")),
                "https://",
            ),
        ] {
            let mut vars = vec![
                (var, value),
                ("PAHEKO_PLUGIN_SECRET", "k"),
                ("PAHEKO_PUSH_ALLOW_HTTP", "true"),
            ];
            vars.extend(extra);
            let e = config(&vars).unwrap_err();
            assert_eq!(e.var, var, "{var}={value}");
            assert!(e.problem.contains(says), "{var}={value}: {e}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
