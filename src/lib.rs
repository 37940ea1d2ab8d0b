//! paheko-push delivers the cash events RecyClique writes to a Redis Stream to the
//! Paheko accounting plugin, acknowledging each one only once the plugin accepted it.
//!
//! ```text
//!   Redis stream ──XREADGROUP──▶ reader ──batches──▶ acker ──events──▶ pushers (N) ──HTTPS──▶ Paheko
//!        ▲                                            │ ▲                   │
//!        └──────────── XACK / dead letter ────────────┘ └─────── done ──────┘
//! ```
//! The reader only reads; the acker owns every decision about an entry (order, ack,
//! dead letter, parking); pushers only speak HTTP. /health reads atomic counters. A
//! stop is one flag plus a closed channel ([`shutdown`]).

pub mod acker;
pub mod breaker;
pub mod check;
pub mod clock;
pub mod config;
pub mod dead;
pub mod error;
pub mod event;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod order;
pub mod probe;
pub mod pusher;
pub mod reader;
pub mod retry;
pub mod shutdown;
pub mod sign;
pub mod stats;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread;

pub use error::Error;

use config::{Config, Raw};
use shutdown::Shutdown;
use stats::Stats;
use store::{Names, Redis};

/// The program: reads the configuration, then runs the command the arguments name.
pub fn main_with(args: &[String]) -> Result<(), Error> {
    match args.first().map(String::as_str) {
        None | Some("run") => {}
        Some("dead") => return dead::main(&args[1..], load_config),
        Some("check") => return check::main(&args[1..], load_config),
        Some("health") => return probe::main(&args[1..], load_config),
        Some("-V" | "--version") => {
            println!("paheko-push {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Some("-h" | "--help") => {
            println!("{}", USAGE);
            return Ok(());
        }
        Some(other) => return Err(Error::Usage(format!("unknown command {other:?}\n{USAGE}"))),
    }
    let config = load_config()?;
    logging::init(
        config.log_level,
        config.log_format,
        logging::Redactor::new(config.secrets()),
    )
    .map_err(|e| Error::Startup(format!("logger: {e}")))?;
    run(config)
}

/// The validated configuration, from the environment and ./.env; the same for every
/// command.
fn load_config() -> Result<Config, Error> {
    let cwd = std::env::current_dir()
        .map_err(|e| Error::Startup(format!("no working directory: {e}")))?;
    let config = Config::from_raw(Raw::from_env(&cwd)?)?;
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
       paheko-push dead list [--json] | show ID... | replay ID...|--all | drop ID...
Delivers RecyClique's cash events from Redis to the Paheko plugin.
Configuration comes from the environment and ./.env; see README.md.";

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
    let names = Names {
        stream: config.stream.clone(),
        group: config.group.clone(),
        consumer: config.consumer.clone(),
        dead_letters: config.dead_letter_stream.clone(),
    };
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
            let (batches_tx, batches_rx) = crossbeam_channel::bounded(4);
            let (work_tx, work_rx) = crossbeam_channel::unbounded();
            let (done_tx, done_rx) = crossbeam_channel::unbounded();
            let agent = pusher::Pusher::agent(
                config.timeout,
                !config.allow_http,
                config.plugin_ca.as_ref(),
            );
            let pusher = Arc::new(pusher::Pusher::new(
                agent,
                plugin.clone(),
                config.retry,
                Arc::clone(&stats),
                shutdown.clone(),
                config.breaker_threshold,
            ));
            let mut threads = Vec::new();
            for n in 0..config.concurrency {
                let (pusher, work, done) = (Arc::clone(&pusher), work_rx.clone(), done_tx.clone());
                threads.push(spawn(&format!("pusher-{n}"), move || {
                    pusher.run(work, done)
                })?);
            }
            drop((work_rx, done_tx));
            let acker = acker::Acker {
                redis: open()?,
                names: names.clone(),
                claim_idle: config.claim_idle,
                max_deliveries: config.max_deliveries,
                stats: Arc::clone(&stats),
                shutdown: shutdown.clone(),
            };
            threads.push(spawn("acker", move || {
                acker.run(batches_rx, done_rx, work_tx)
            })?);
            let reader = reader::Reader {
                redis: open()?,
                names,
                order_keys: config.order_keys.clone(),
                claim_idle: config.claim_idle,
                stats: Arc::clone(&stats),
                shutdown: shutdown.clone(),
            };
            threads.push(spawn("reader", move || reader.run(batches_tx))?);
            for t in threads {
                let _ = t.join();
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

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<thread::JoinHandle<()>, Error> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| Error::Startup(format!("cannot start thread {name}: {e}")))
}
