//! An HTTPS stand-in for the Paheko plugin, and the private certificate authority it
//! needs.
//!
//! [`TestPki`] makes, with the system's `openssl` command, a CA and a server certificate
//! for `localhost` and `127.0.0.1` in a temp dir of its own; the same files serve a
//! redis-server started with TLS. [`TlsSink`] is a small rustls server on an ephemeral
//! port that records every request (as the plain [`Sink`](super::Sink) does, with the
//! same [`Received`]) and answers 204, and that also counts completed handshakes and
//! keeps the error of each refused one, so a test can tell "the client refused our
//! certificate" from "nothing connected".
//!
//! Declared from tests/tests.rs (`#[path]`), so it is `crate::tls_sink`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;

use crate::util::{POLL_INTERVAL, Received};

/// How long a connection may sit idle before the sink drops it.
const IDLE: Duration = Duration::from_secs(30);
/// The path the sink's URL points at (any path is accepted and recorded).
const PUSH_PATH: &str = "/paheko/push";

/// A private CA and a server certificate signed by it, valid for `localhost` and
/// `127.0.0.1`, as PEM files in a temp dir.
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// Generates the CA and the server certificate (EC P-256, valid two days).
    pub fn generate() -> TestPki {
        TestPki::generate_for("localhost")
    }

    /// Like [`generate`](Self::generate), the server certificate valid for `host` (a
    /// DNS name) and `127.0.0.1`.
    pub fn generate_for(host: &str) -> TestPki {
        TestPki::generate_with_san(&format!("DNS:{host},IP:127.0.0.1"))
    }

    /// Like [`generate`](Self::generate), the server certificate valid for the names of
    /// `san` only (an openssl subjectAltName value, e.g. `DNS:paheko.example.org`).
    pub fn generate_with_san(san: &str) -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("paheko-pki-")
            .tempdir()
            .expect("creating the PKI temp dir");
        let pki = TestPki { dir };
        std::fs::write(
            pki.path("server.ext"),
            format!(
                "subjectAltName={san}\n\
                 basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\n"
            ),
        )
        .expect("writing server.ext");
        pki.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=paheko-push test CA",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        pki.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=paheko-push test server",
        ]);
        pki.openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "2",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        pki
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| {
                panic!("running openssl (scripts/test installs it when missing): {e}")
            });
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate: what `PAHEKO_PLUGIN_CA_FILE` and `REDIS_CA_FILE` point at.
    pub fn ca_pem(&self) -> PathBuf {
        self.path("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.path("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.path("server.key")
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let certs = CertificateDer::pem_file_iter(self.server_cert())
            .expect("reading server.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("parsing server.pem");
        let key = PrivateKeyDer::from_pem_file(self.server_key()).expect("reading server.key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("a usable server certificate");
        Arc::new(config)
    }
}

/// An HTTPS server on `127.0.0.1` and an ephemeral port that answers 204 to everything.
/// Stops accepting on drop.
pub struct TlsSink {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    handshakes: AtomicUsize,
    tls_errors: Mutex<Vec<String>>,
    received: Mutex<Vec<Received>>,
    attempts: Mutex<HashMap<Option<String>, u32>>,
}

impl TlsSink {
    /// Serves `pki`'s server certificate.
    pub fn start(pki: &TestPki) -> TlsSink {
        let config = pki.server_config();
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the TLS sink");
        let port = listener.local_addr().expect("TLS sink address").port();
        let shared = Arc::new(Shared::default());
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("tls-sink-accept".into())
                .spawn(move || {
                    for tcp in listener.incoming() {
                        if shared.stopping.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(tcp) = tcp else { continue };
                        let (shared, config) = (Arc::clone(&shared), Arc::clone(&config));
                        let _ = thread::Builder::new()
                            .name("tls-sink-conn".into())
                            .spawn(move || shared.serve(tcp, config));
                    }
                })
                .expect("spawning the TLS sink")
        };
        TlsSink {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `https://127.0.0.1:PORT/paheko/push`.
    pub fn url(&self) -> String {
        self.url_for("127.0.0.1")
    }

    /// The URL with another host name for this machine, such as `localhost`.
    pub fn url_for(&self, host: &str) -> String {
        format!("https://{host}:{}{PUSH_PATH}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Handshakes that completed (the client trusted the certificate).
    pub fn handshakes(&self) -> usize {
        self.shared.handshakes.load(Ordering::SeqCst)
    }

    /// Why each refused handshake failed, as rustls on the server side saw it (for a
    /// client that refused the certificate: the alert it sent).
    pub fn tls_errors(&self) -> Vec<String> {
        self.shared.tls_errors.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests have arrived, and returns them all.
    pub fn wait_for_count(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?}: {n} requests at the TLS sink (got {}; \
                     handshakes {}, TLS errors {:?})",
                    received.len(),
                    self.handshakes(),
                    self.tls_errors()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for TlsSink {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor out of accept().
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

impl Shared {
    fn serve(&self, mut tcp: TcpStream, config: Arc<rustls::ServerConfig>) {
        let _ = tcp.set_read_timeout(Some(IDLE));
        let Ok(mut conn) = rustls::ServerConnection::new(config) else {
            return;
        };
        while conn.is_handshaking() {
            match conn.complete_io(&mut tcp) {
                Ok((0, 0)) => return, // closed before finishing: nothing to report
                Ok(_) => {}
                Err(e) => {
                    self.tls_errors.lock().unwrap().push(e.to_string());
                    return;
                }
            }
        }
        self.handshakes.fetch_add(1, Ordering::SeqCst);
        let mut stream = BufReader::new(rustls::StreamOwned::new(conn, tcp));
        while !self.stopping.load(Ordering::SeqCst) {
            let Some((method, path, headers)) = read_head(&mut stream) else {
                return;
            };
            let length = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            if stream.read_exact(&mut body).is_err() {
                return;
            }
            let index = self.record(Received {
                at: Instant::now(),
                at_wall: std::time::SystemTime::now(),
                method,
                path,
                headers,
                body,
                attempt: 0,
                answered: None,
                answered_at: None,
            });
            let writing = Instant::now();
            let out = stream.get_mut();
            if out
                .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                .and_then(|()| out.flush())
                .is_err()
            {
                return;
            }
            let mut received = self.received.lock().unwrap();
            received[index].answered = Some(204);
            received[index].answered_at = Some(writing);
        }
    }

    /// Returns the request's index in the log, where its answer is written later.
    fn record(&self, mut received: Received) -> usize {
        let mut attempts = self.attempts.lock().unwrap();
        let n = attempts
            .entry(received.idempotency_key().map(str::to_owned))
            .or_insert(0);
        *n += 1;
        received.attempt = *n;
        let mut log = self.received.lock().unwrap();
        log.push(received);
        log.len() - 1
    }
}

/// A request's method, target and headers (names lowercased).
type Head = (String, String, Vec<(String, String)>);

/// The request line and headers, or `None` at the end of the connection.
fn read_head(stream: &mut impl BufRead) -> Option<Head> {
    let mut line = String::new();
    if stream.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            return Some((method, path, headers));
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
}
