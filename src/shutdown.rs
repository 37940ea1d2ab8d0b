//! Coordinated stop: one flag every thread checks, and a channel that is closed at the
//! same moment so that a thread waiting out a backoff wakes at once instead of sleeping
//! on. SIGTERM and SIGINT trigger it from a thread of their own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    stopping: AtomicBool,
    /// Dropped on [`Shutdown::trigger`]; its receivers then wake with `Disconnected`.
    wake: Mutex<Option<Sender<()>>>,
    woken: Receiver<()>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (tx, rx) = crossbeam_channel::bounded(0);
        Shutdown {
            inner: Arc::new(Inner {
                stopping: AtomicBool::new(false),
                wake: Mutex::new(Some(tx)),
                woken: rx,
            }),
        }
    }

    pub fn trigger(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        if let Ok(mut wake) = self.inner.wake.lock() {
            wake.take();
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    /// Sleeps for `d`, or less if a stop is triggered meanwhile. Returns false when the
    /// sleep was cut short by a stop.
    pub fn sleep(&self, d: Duration) -> bool {
        if self.is_stopping() {
            return false;
        }
        match self.inner.woken.recv_timeout(d) {
            Err(RecvTimeoutError::Timeout) => !self.is_stopping(),
            _ => false,
        }
    }

    /// A receiver that becomes ready (disconnected) when the stop is triggered, for
    /// `crossbeam_channel::select!`.
    pub fn signal(&self) -> &Receiver<()> {
        &self.inner.woken
    }
}

/// Triggers `shutdown` on the first SIGTERM or SIGINT. A second one exits at once with
/// status 130: whatever was not acknowledged stays pending in Redis for the next start.
pub fn on_signals(shutdown: Shutdown) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut seen = 0;
        for signal in signals.forever() {
            seen += 1;
            if seen > 1 {
                log::warn!(signal; "second stop signal: exiting now, unacknowledged events stay pending");
                std::process::exit(130);
            }
            log::info!(signal; "stop signal received: finishing the requests in flight");
            shutdown.trigger();
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn trigger_cuts_a_sleep_short() {
        let s = Shutdown::new();
        assert!(s.sleep(Duration::from_millis(1)));
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            (s2.sleep(Duration::from_secs(30)), start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        s.trigger();
        let (completed, took) = t.join().unwrap();
        assert!(!completed);
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert!(s.is_stopping());
        assert!(!s.sleep(Duration::from_secs(30)));
    }
}
