//! paheko-push delivers the cash events RecyClique writes to a Redis Stream to the
//! Paheko accounting plugin, acknowledging each one only once the plugin accepted it.
//!
//! ```text
//!   Redis stream ──XREADGROUP──▶ reader ──batches──▶ acker ──events──▶ pushers (N) ──HTTPS──▶ Paheko
//!        ▲                                            │ ▲                   │
//!        └──────────── XACK / dead letter ────────────┘ └─────── done ──────┘
//! ```
//! The reader only reads; the acker owns every decision about an entry (order, ack,
//! dead letter, retry timing, the circuit breaker, giving up); pushers make one HTTP
//! attempt each and report back. /health reads atomic counters. A
//! stop is one flag plus a closed channel ([`shutdown`]).

pub mod acker;
pub mod booking;
pub mod breaker;
pub mod budget;
pub mod check;
pub mod clock;
pub mod config;
pub mod core;
pub mod dead;
pub mod error;
pub mod event;
pub mod health;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod order;
pub mod paheko_api;
pub mod privileges;
pub mod probe;
pub mod pusher;
pub mod reader;
pub mod retry;
pub mod shutdown;
pub mod sign;
pub mod stats;
pub mod store;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread;

pub use error::Error;

use config::{Config, Raw};
use shutdown::Shutdown;
use stats::Stats;
use store::Redis;

/// The program: reads the configuration, then runs the command the arguments name.
pub fn main_with(args: &[String]) -> Result<(), Error> {
    // The operator commands fall back on the package's configuration file; the
    // worker does not: under systemd it gets that file from EnvironmentFile= and
    // could not read it itself (DynamicUser, mode 0640).
    let package = Some(Path::new(config::PACKAGE_ENV_FILE));
    match args.first().map(String::as_str) {
        None | Some("run") => {}
        Some("dead") => {
            return dead::main(&args[1..], || {
                let config = load_config(package)?;
                if config.source.file.is_some() {
                    eprintln!("paheko-push: configuration from {}", config.source);
                }
                Ok(config)
            });
        }
        Some("check") => return check::main(&args[1..], || load_config(package)),
        Some("health") => return probe::main(&args[1..], || load_config(package)),
        Some("-V" | "--version" | "version") => {
            println!("paheko-push {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Some("-h" | "--help" | "help") => {
            return help(&args[1..]);
        }
        Some(other) => return Err(Error::Usage(format!("unknown command {other:?}\n{USAGE}"))),
    }
    if help_asked("run", args.get(1..).unwrap_or_default(), RUN_USAGE)? {
        return Ok(());
    }
    let config = load_config(None)?;
    logging::init(
        config.log_level,
        config.log_format,
        logging::Redactor::new(config.secrets()),
    )
    .map_err(|e| Error::Startup(format!("logger: {e}")))?;
    for warning in config.warnings() {
        log::warn!("{warning}");
    }
    run(config)
}

/// `paheko-push help [COMMAND]`: the usage, or one command's.
fn help(args: &[String]) -> Result<(), Error> {
    let usage = match args.first().map(String::as_str) {
        None => USAGE,
        Some("run") => RUN_USAGE,
        Some("check") => check::USAGE,
        Some("health") => probe::USAGE,
        Some("dead") => dead::USAGE,
        Some(other) => {
            return Err(Error::Usage(format!(
                "no help for {other:?}: not a command\n{USAGE}"
            )));
        }
    };
    println!("{usage}");
    Ok(())
}

/// For a subcommand that takes no argument: true when `--help` was asked (the usage is
/// printed), a usage error naming the argument when something else was given.
pub(crate) fn help_asked(command: &str, args: &[String], usage: &str) -> Result<bool, Error> {
    match args.first().map(String::as_str) {
        None => Ok(false),
        Some("-h" | "--help") => {
            println!("{usage}");
            Ok(true)
        }
        Some(other) => Err(Error::Usage(format!(
            "{command} takes no argument, got {other:?}\n{usage}"
        ))),
    }
}

/// The validated configuration, from the environment and a file of variables (see
/// [`config::Raw::from_env`]); the same for every command. In the container image the
/// program starts as root to read a secret only root can read, then runs as
/// `PAHEKO_PUSH_RUN_AS` ([`privileges`]) before anything else happens.
fn load_config(package: Option<&Path>) -> Result<Config, Error> {
    let cwd = std::env::current_dir()
        .map_err(|e| Error::Startup(format!("no working directory: {e}")))?;
    let config = Config::from_raw(Raw::from_env(&cwd, package)?)?;
    if let Some(user) = config.run_as {
        privileges::become_user(user).map_err(Error::Startup)?;
    }
    // Checked before anything touches Redis, so a bad URL is a configuration error.
    Redis::open_with_ca(
        &config.redis_url,
        config.redis_ca.as_ref(),
        reader::READ_TIMEOUT,
    )
    .map_err(|e| {
        Error::Config(config::ConfigError {
            var: "REDIS_URL".into(),
            problem: format!("{} ({e})", config::redact_url(&config.redis_url)),
        })
    })?;
    Ok(config)
}

const USAGE: &str = "usage: paheko-push [run]
       paheko-push check
       paheko-push health
       paheko-push dead list [--json] | show ID... | replay ID...|--all | drop ID... | book ID...
       paheko-push help [COMMAND] | --version
Delivers RecyClique's cash events from Redis to the Paheko plugin.
  run     the worker (the default)
  check   checks the configuration, Redis, the plugin and its secret (a ping); changes nothing
  health  asks the running worker for its /health; exit 0 when it is ok
  dead    the dead letters: list, show, replay, drop
Configuration comes from the environment, completed by PAHEKO_PUSH_ENV_FILE or ./.env;
check, health and dead read /etc/paheko-push/paheko-push.env when neither exists and
no REDIS_/PAHEKO_ variable is set. See README.md.";

const RUN_USAGE: &str = "usage: paheko-push [run]
Delivers RecyClique's cash events from Redis to the Paheko plugin until SIGTERM or
SIGINT. Configuration comes from the environment, completed by PAHEKO_PUSH_ENV_FILE or
./.env; see README.md.";

/// Runs the worker until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), Error> {
    let stats = Arc::new(Stats::default());
    stats.configured.store(config.plugin.is_ok(), Relaxed);
    stats.backlog_warn.store(config.backlog_warn, Relaxed);
    let shutdown = Shutdown::new();
    shutdown::on_signals(shutdown.clone())
        .map_err(|e| Error::Startup(format!("signal handlers: {e}")))?;
    notify::stopping_on(&shutdown).map_err(|e| Error::Startup(format!("notify thread: {e}")))?;
    let health = match &config.health_addr {
        Some(addr) => Some(
            health::serve(addr, Arc::clone(&stats))
                .map_err(|e| Error::Startup(format!("PAHEKO_PUSH_HEALTH_ADDR: {e}")))?,
        ),
        None => None,
    };
    let names = config.names();
    let open = || {
        Redis::open_with_ca(
            &config.redis_url,
            config.redis_ca.as_ref(),
            reader::READ_TIMEOUT,
        )
        .map_err(|e| Error::Startup(e.to_string()))
    };
    log::info!(
        version = env!("CARGO_PKG_VERSION"), stream = names.stream.as_str(), group = names.group.as_str(),
        consumer = names.consumer.as_str(), redis = config::redact_url(&config.redis_url).as_str(),
        concurrency = config.concurrency;
        "paheko-push starting"
    );
    match &config.plugin {
        Err(missing) => {
            log::error!(variable = missing.0;
                "{missing}: nothing is delivered until it is set; events stay queued in Redis");
            reader::watch(open()?, &names, &stats, &shutdown);
        }
        Ok(plugin) => {
            let (read_ops_tx, read_ops_rx) = crossbeam_channel::unbounded();
            let (reads_tx, reads_rx) = crossbeam_channel::unbounded();
            let (work_tx, work_rx) = crossbeam_channel::unbounded();
            let (done_tx, done_rx) = crossbeam_channel::unbounded();
            let agent = pusher::Pusher::agent(
                config.timeout,
                !config.allow_http,
                config.plugin_ca.as_ref(),
            );
            let gate = Arc::new(pusher::Gate::default());
            let pusher = Arc::new(
                pusher::Pusher::new(
                    agent,
                    plugin.clone(),
                    Arc::clone(&stats),
                    shutdown.clone(),
                    Arc::clone(&gate),
                )
                .with_target(&config),
            );
            let liveness = watched_threads(&config);
            notify::watch_threads(Arc::clone(&liveness));
            let mut threads = Vec::new();
            for n in 0..config.concurrency {
                let (pusher, work, done) = (Arc::clone(&pusher), work_rx.clone(), done_tx.clone());
                let beat = liveness.beat(n + 1);
                threads.push(spawn(&format!("pusher-{n}"), move || {
                    pusher.run(work, done, beat)
                })?);
            }
            drop((work_rx, done_tx));
            let settings = core::Settings {
                retry: config.retry,
                dead_letter_statuses: config.dead_letter_statuses.clone(),
                give_up_after_parks: config.give_up_after_parks,
                breaker_threshold: config.breaker_threshold,
                max_deliveries: config.max_deliveries,
                window: 8 * config.concurrency,
                lease_ttl: config.lease,
                request_timeout: config.timeout,
                max_held: budget::MAX_HELD,
                max_held_bytes: budget::MAX_HELD_BYTES,
                read_count: reader::COUNT,
                claim_idle: config.claim_idle,
                seed: retry::Rng::from_entropy().next_u64(),
                #[cfg(test)]
                bugs: Default::default(),
            };
            let acker = acker::Acker {
                redis: open()?,
                lease: lease::Lease::new(&names, config.lease),
                names: names.clone(),
                core: core::Core::new(settings, std::time::Instant::now()),
                stats: Arc::clone(&stats),
                shutdown: shutdown.clone(),
                beat: liveness.beat(0),
                gate,
            };
            let channels = acker::Channels {
                read_ops: read_ops_tx,
                reads: reads_rx,
                work: work_tx,
                done: done_rx,
            };
            threads.push(spawn("acker", move || acker.run(channels))?);
            let reader = reader::Reader {
                redis: open()?,
                names,
                order_keys: config.order_keys.clone(),
                claim_idle: config.claim_idle,
                stats: Arc::clone(&stats),
                shutdown: shutdown.clone(),
                forget_consumers_after: config.forget_consumers_after,
            };
            let reader = spawn("reader", move || reader.run(read_ops_rx, reads_tx))?;
            for t in threads {
                let _ = t.join();
            }
            // A Redis too old to run with: the reader stopped the worker, exit with it.
            if let Ok(Err(e)) = reader.join() {
                if let Some(health) = health {
                    health.stop();
                }
                return Err(e);
            }
        }
    }
    // Already sent when the stop began, unless the process got here first.
    notify::stopping();
    if let Some(health) = health {
        health.stop();
    }
    log::info!(delivered = stats.delivered.load(Relaxed); "stopped");
    Ok(())
}

/// The threads the watchdog vouches for besides the reader (which asks for the pings,
/// so a stuck reader stops them by itself): the acker, slot 0, then the pushers. A step
/// may last as long as the watchdog interval (docs/systemd.md asks for 25 s or more, past
/// any Redis timeout), a request as long as its timeout and a margin.
fn watched_threads(config: &Config) -> Arc<notify::Liveness> {
    let interval = notify::watchdog_timeout().unwrap_or(std::time::Duration::from_secs(30));
    let request = interval.max(config.timeout + std::time::Duration::from_secs(5));
    let mut threads = vec![("acker".to_string(), interval)];
    threads.extend((0..config.concurrency).map(|n| (format!("pusher-{n}"), request)));
    notify::Liveness::new(threads)
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<thread::JoinHandle<T>, Error> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| Error::Startup(format!("cannot start thread {name}: {e}")))
}
