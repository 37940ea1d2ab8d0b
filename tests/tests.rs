//! Integration tests: the real `paheko-push` binary against a real redis-server and a
//! real HTTP sink, all private to each test (see `util`). One binary, one module per
//! area.

mod util;

mod harness;
mod delivery;
mod lifecycle;
mod configuration;
mod observability;
mod dead_letters;
mod resilience;
mod signing;
mod systemd;
mod tls;
#[path = "util/tls_sink.rs"]
mod tls_sink;
mod chaos;
mod metrics;
