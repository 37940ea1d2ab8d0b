//! The acker thread: the coordinator's driver. Every decision about an entry after it
//! is read — order, acknowledgements, dead letters, retries, the breaker, the budget,
//! the lease and its tenures — is taken by [`Core`], which does no I/O; this thread
//! turns the core's commands into Redis calls (on its own connection), reads for the
//! reader thread and attempts for the pushers, and turns what comes back into the
//! core's inputs, with the time they happened. Its `select!` waits on the reader, the
//! pushers and the stop signal, with the core's next deadline as its timeout: no thread
//! sleeps while work waits, and no lock is shared. It copies the core's figures into
//! [`Stats`] for /health and /metrics, and logs what changed.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, never, select};

use crate::breaker::Cause;
use crate::core::{
    Answer, Command, Core, Input, LeaseOp, LeaseReply, ReadOp, ReadReply, Reply, Write, WriteReply,
};
use crate::lease::Lease;
use crate::notify::Beat;
use crate::pusher::{self, Attempt, Done, Gate};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::store::{self, DeadLettered, Names, Redis};

/// How long the loop waits when no timer is set.
const IDLE_WAIT: Duration = Duration::from_secs(3600);

pub struct Acker {
    pub redis: Redis,
    pub names: Names,
    pub lease: Lease,
    pub core: Core,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
    /// Tells the watchdog whether this thread is waiting or busy on a step.
    pub beat: Beat,
    /// What the pushers may start.
    pub gate: Arc<Gate>,
}

/// The channels the acker drives: the reader's ops and results, the pushers' work and
/// reports.
pub struct Channels {
    pub read_ops: Sender<ReadOp>,
    pub reads: Receiver<ReadReply>,
    pub work: Sender<Attempt>,
    pub done: Receiver<Done>,
}

impl Acker {
    pub fn run(mut self, channels: Channels) {
        let Channels {
            read_ops,
            reads,
            work,
            done,
        } = channels;
        let mut stop_seen = false;
        let mut reader_gone = false;
        let mut pending: Vec<Input> = vec![Input::Tick];
        let mut seen = Seen::default();
        loop {
            // Feed the core, and carry out what it asks, until it asks nothing more.
            while !pending.is_empty() {
                for input in pending.drain(..) {
                    self.core.handle(Instant::now(), input);
                }
                while let Some(command) = self.core.poll() {
                    if let Some(input) = self.execute(command, &read_ops, &work) {
                        pending.push(input);
                    }
                }
            }
            self.show(&mut seen);
            if self.core.exited() {
                return;
            }
            let now = Instant::now();
            let timeout = self
                .core
                .poll_timeout(now)
                .map_or(IDLE_WAIT, |t| t.saturating_duration_since(now));
            let stop_signal = if stop_seen {
                never()
            } else {
                self.shutdown.signal().clone()
            };
            let from_reader = if reader_gone { never() } else { reads.clone() };
            self.beat.idle();
            select! {
                recv(from_reader) -> r => match r {
                    Ok(r) => pending.push(Input::Read(r)),
                    Err(_) => reader_gone = true,
                },
                recv(done) -> d => if let Ok(d) = d { pending.push(answer(d)) },
                recv(stop_signal) -> _ => {},
                default(timeout) => {},
            }
            self.beat.busy();
            #[cfg(debug_assertions)]
            test_hooks::stall_once_delivered(self.core.counters.delivered, &self.shutdown);
            // Everything already reported, in one go: acknowledgements go out as one batch.
            pending.extend(done.try_iter().map(answer));
            if !stop_seen && self.shutdown.is_stopping() {
                stop_seen = true;
                pending.push(Input::Stop);
            }
            pending.push(Input::Tick);
        }
    }

    /// Carries out one command; a Redis call's result comes back as an input.
    fn execute(
        &mut self,
        command: Command,
        read_ops: &Sender<ReadOp>,
        work: &Sender<Attempt>,
    ) -> Option<Input> {
        match command {
            Command::Lease(op) => Some(Input::Lease(self.lease_op(op))),
            Command::Read(op) => {
                // The reader is gone only at the very end of a stop.
                let _ = read_ops.send(op);
                None
            }
            Command::Send {
                event,
                probe,
                tenure,
            } => {
                if let Err(e) = work.send(Attempt {
                    event,
                    probe,
                    tenure,
                }) {
                    // The pushers are gone: only at the very end of a stop.
                    let Attempt { event, tenure, .. } = e.into_inner();
                    return Some(Input::Answer(Answer {
                        tenure,
                        event,
                        reply: Reply::Unsent,
                        took: Duration::ZERO,
                    }));
                }
                None
            }
            Command::Gate {
                tenure,
                send_until,
                breaker_open,
            } => {
                self.gate.set(tenure, send_until, breaker_open);
                None
            }
            Command::Write(write) => Some(Input::Wrote(self.write(write))),
            Command::Exit => None,
        }
    }

    fn lease_op(&mut self, op: LeaseOp) -> LeaseReply {
        let failed = |e: redis::RedisError| LeaseReply::Failed {
            error: e.to_string(),
        };
        match op {
            LeaseOp::Take => self
                .lease
                .take(&mut self.redis, &self.names)
                .unwrap_or_else(failed),
            LeaseOp::TakeFromDead { value } => self
                .lease
                .take_from_dead(&mut self.redis, &self.names, &value)
                .unwrap_or_else(failed),
            LeaseOp::Renew { value } => {
                // The lease runs from when the renewal was sent, not from its answer
                // (a stalled Redis answers late).
                let sent_at = Instant::now();
                match self.lease.renew(&mut self.redis, &value) {
                    Ok(ok) => LeaseReply::Renewed { sent_at, ok },
                    Err(e) => failed(e),
                }
            }
            LeaseOp::Release { value } => {
                match self.lease.release(&mut self.redis, &value) {
                    Ok(true) => log::info!("lease released: a standby takes over at once"),
                    Ok(false) => {}
                    Err(e) => log::warn!(error = e.to_string().as_str();
                        "could not release the lease: a standby takes over once it expires"),
                }
                LeaseReply::Released
            }
        }
    }

    fn write(&mut self, write: Write) -> WriteReply {
        let result = match write {
            Write::Ack { ids, lease_value } => self
                .lease
                .ack(&mut self.redis, &self.names, &lease_value, &ids)
                .map(|acked| {
                    // /health's pending count goes down with each acknowledgement, not
                    // only at the reader's next count (`paheko-push health` said
                    // "pending 1" after everything was delivered).
                    if let Some(n) = acked {
                        let _ = self
                            .stats
                            .pending
                            .fetch_update(Relaxed, Relaxed, |p| Some(p.saturating_sub(n)));
                    }
                    WriteReply::Acked {
                        ids,
                        held: acked.is_some(),
                    }
                }),
            Write::DeadLetter { dead, lease_value } => store::dead_letter(
                &mut self.redis,
                &self.names,
                self.lease.key(),
                &lease_value,
                &dead,
            )
            .map(|moved| WriteReply::DeadLettered {
                id: dead.id,
                outcome: moved.into(),
            }),
            Write::Touch { ids } => {
                store::touch(&mut self.redis, &self.names, &ids).map(|()| WriteReply::Touched)
            }
            Write::Trimmed { id, lease_value } => store::record_vanished(
                &mut self.redis,
                &self.names,
                self.lease.key(),
                &lease_value,
                id,
            )
            .map(|moved| {
                if moved == DeadLettered::Moved {
                    // /health degrades at once, not at the reader's next count of them.
                    self.stats.trimmed_records.fetch_add(1, Relaxed);
                }
                WriteReply::DeadLettered {
                    id,
                    outcome: moved.into(),
                }
            }),
        };
        result.unwrap_or_else(|e| WriteReply::Failed {
            error: e.to_string(),
        })
    }

    /// Copies the core's figures into the counters /health and /metrics read.
    fn show(&self, seen: &mut Seen) {
        let c = &self.core.counters;
        let stats = &self.stats;
        if c.delivered > seen.delivered {
            stats.consecutive_failures.store(0, Relaxed);
            stats
                .last_success_at
                .store(crate::clock::unix_now(), Relaxed);
        }
        if c.failures > seen.failures {
            stats
                .consecutive_failures
                .fetch_add(c.failures - seen.failures, Relaxed);
        }
        seen.delivered = c.delivered;
        seen.failures = c.failures;
        stats.delivered.store(c.delivered, Relaxed);
        stats.retried.store(c.retried, Relaxed);
        stats.dead_lettered.store(c.dead_lettered, Relaxed);
        stats.invalid.store(c.invalid, Relaxed);
        stats.lost_to_trim.store(c.lost_to_trim, Relaxed);
        stats.active.store(self.core.is_active(), Relaxed);
        stats
            .redis_writes_failing
            .store(self.core.redis_writes_failing(), Relaxed);
        stats.parked.store(self.core.parked() as u64, Relaxed);
        let (held, held_bytes) = self.core.held();
        stats.held.store(held as u64, Relaxed);
        stats.held_bytes.store(held_bytes as u64, Relaxed);
        match self.core.breaker_cause() {
            None => {
                stats.paheko_down_since.store(0, Relaxed);
                stats.paheko_refusing.store(0, Relaxed);
            }
            Some(cause) => {
                let _ = stats.paheko_down_since.compare_exchange(
                    0,
                    crate::clock::unix_now(),
                    Relaxed,
                    Relaxed,
                );
                let refusing = match cause {
                    Cause::Refusing(status) => u64::from(status),
                    Cause::Down => 0,
                };
                stats.paheko_refusing.store(refusing, Relaxed);
            }
        }
    }
}

/// The core's counters as last shown: a change in them is a delivery or a failure.
#[derive(Default)]
struct Seen {
    delivered: u64,
    failures: u64,
}

/// A pusher's report as the core's input: `Retry-After` turned into a wait now, since
/// the core reads no clock.
fn answer(d: Done) -> Input {
    let Done {
        event,
        reply,
        took,
        tenure,
    } = d;
    let reply = match reply {
        pusher::Reply::Status {
            status,
            retry_after,
            body,
        } => Reply::Status {
            status,
            retry_after: crate::retry::retry_after_for(
                status,
                retry_after.as_deref(),
                crate::clock::unix_now(),
            ),
            body,
        },
        pusher::Reply::NoAnswer(error) => Reply::NoAnswer(error),
        pusher::Reply::NotSent | pusher::Reply::HeldBack => Reply::Unsent,
    };
    Input::Answer(Answer {
        tenure,
        event,
        reply,
        took,
    })
}

impl From<DeadLettered> for crate::core::Moved {
    fn from(d: DeadLettered) -> Self {
        match d {
            DeadLettered::Moved => crate::core::Moved::Moved,
            DeadLettered::WasNotPending => crate::core::Moved::WasNotPending,
            DeadLettered::NotHolder => crate::core::Moved::NotHolder,
        }
    }
}

/// What the integration tests need to fake a fault that cannot be caused from outside;
/// compiled in debug builds only (the release binary has none of it), and inert unless
/// the variable is set, as cargo's `__CARGO_TEST_*` hooks.
#[cfg(debug_assertions)]
mod test_hooks {
    /// `__PAHEKO_PUSH_TEST_STALL_ACKER=1`: once a ticket was accepted, the acker hangs
    /// (until the stop), as a wedged thread would, so the watchdog test can see the
    /// pings stop.
    pub fn stall_once_delivered(accepted: u64, shutdown: &crate::shutdown::Shutdown) {
        if accepted > 0 && std::env::var_os("__PAHEKO_PUSH_TEST_STALL_ACKER").is_some() {
            while shutdown.sleep(std::time::Duration::from_secs(1)) {}
        }
    }
}
