//! Integration tests: the real `paheko-push` binary against a real redis-server and a
//! real HTTP sink, all private to each test (see `util`). One binary, one module per
//! area.

mod util;

mod alerts;
mod answers;
mod chaos;
mod configuration;
mod coordinator;
mod crash;
mod dead_letters;
mod delivery;
mod dotenv;
mod failover;
mod harness;
mod health_command;
mod held;
mod lifecycle;
mod metrics;
mod observability;
mod operator;
mod packaging;
mod paheko_api;
mod paheko_plugin;
mod resilience;
mod retries;
mod shops;
mod signing;
mod systemd;
mod tls;
#[path = "util/tls_sink.rs"]
mod tls_sink;
mod trim;
