//! Packaging (issue 10): the Debian package, the static binary and the container image
//! that scripts/test builds (scripts/package, scripts/build-static, podman build),
//! checked from the outside. What the package holds, with which modes; what lintian and
//! systemd-analyze say of it; whether its binary delivers; whether the static binary,
//! and the image's, run in an empty root holding only themselves, /etc/hosts and a CA
//! bundle, and deliver by host name to a private Redis and a TLS plugin stand-in.
//!
//! Each test finds its artifact through a variable scripts/test sets
//! (`PAHEKO_PUSH_TEST_DEB`, `…_STATIC`, `…_IMAGE`): a bare `cargo test` says loudly
//! that it skipped them, and under `CI=true` a missing artifact or tool fails.

use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::util::*;
use crate::tls_sink::{TestPki, TlsSink};

const T: Duration = Duration::from_secs(30);
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The host names the empty root's /etc/hosts gives to Redis and the plugin: names no
/// resolver but that file knows.
const REDIS_HOST: &str = "redis.paheko-push.test";
const PLUGIN_HOST: &str = "plugin.paheko-push.test";

/// The absolute path of `command` on PATH (children here get no PATH of their own).
pub(crate) fn which(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(command))
        .find(|p| p.is_file())
}

/// `command`, or `None` after [`skip`] (scripts/test installs it from `package`).
pub(crate) fn need(command: &str, package: &str) -> Option<PathBuf> {
    let found = which(command);
    if found.is_none() {
        skip(&format!(
            "{command} is not installed (scripts/test installs the {package} package)"
        ));
    }
    found
}

/// An artifact scripts/test built, from its variable.
fn artifact(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            skip(&format!(
                "{what} not checked: {var} is not set (scripts/test builds it and sets it)"
            ));
            None
        }
    }
}

/// Runs `command` to the end; panics if it cannot start.
pub(crate) fn output(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"))
}

/// Runs `command`, which must succeed; its stdout.
pub(crate) fn succeed(command: &mut Command) -> String {
    let out = output(command);
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn temp(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

/// `dpkg-deb -x`: the package's files under a temp dir.
fn extract(deb: &str) -> tempfile::TempDir {
    let dir = temp("paheko-deb-");
    succeed(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir.path()));
    dir
}

#[test]
fn the_deb_holds_the_program_the_units_the_conffile_and_the_docs() {
    let Some(deb) = artifact("PAHEKO_PUSH_TEST_DEB", "the Debian package") else {
        return;
    };
    if need("dpkg-deb", "dpkg").is_none() {
        return;
    }
    assert!(
        deb.ends_with(&format!("paheko-push_{VERSION}-1_amd64.deb")),
        "{deb}"
    );
    // "-rwxr-xr-x root/root   3821936 2026-11-28 21:19 ./usr/bin/paheko-push"
    let listing = succeed(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let entries: Vec<(&str, &str, &str)> = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((*f.first()?, *f.get(1)?, *f.get(5)?))
        })
        .collect();
    let mode_of = |path: &str| {
        entries
            .iter()
            .find(|(_, _, p)| *p == path)
            .map(|(mode, owner, _)| format!("{mode} {owner}"))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
    };
    assert_eq!(mode_of("./usr/bin/paheko-push"), "-rwxr-xr-x 0/0");
    assert_eq!(
        mode_of("./etc/paheko-push/paheko-push.env"),
        "-rw-r----- 0/0"
    );
    for unit in ["paheko-push.service", "paheko-push@.service"] {
        assert_eq!(
            mode_of(&format!("./usr/lib/systemd/system/{unit}")),
            "-rw-r--r-- 0/0"
        );
    }
    for doc in [
        "README.md",
        "copyright",
        "changelog.Debian.gz",
        "docs/systemd.md",
        "docs/plugin-contract.md",
        "docs/dead-letters.md",
        "examples/plugin/README.md",
        "examples/compose.yaml",
        "examples/paheko-push.rules.yml",
    ] {
        assert_eq!(
            mode_of(&format!("./usr/share/doc/paheko-push/{doc}")),
            "-rw-r--r-- 0/0"
        );
    }
    for file in [
        "plugin.ini",
        "install.php",
        "lib/Receiver.php",
        "public/index.php",
        "admin/index.php",
        "templates/index.tpl",
    ] {
        assert_eq!(
            mode_of(&format!("./usr/share/paheko-push/plugin/recyclique/{file}")),
            "-rw-r--r-- 0/0"
        );
    }
    assert!(
        !entries.iter().any(|(_, _, p)| p.starts_with("./usr/local")),
        "{listing}"
    );

    let info = succeed(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for field in [
        "Package: paheko-push".to_string(),
        format!("Version: {VERSION}-1"),
        "Architecture: amd64".to_string(),
    ] {
        assert!(info.contains(&field), "{field} missing:\n{info}");
    }
    let depends = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends:"))
        .unwrap_or_else(|| panic!("no Depends:\n{info}"));
    assert!(depends.contains("libc6"), "{depends}");

    let control = temp("paheko-deb-control-");
    succeed(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb)
            .arg(control.path()),
    );
    let conffiles = fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/paheko-push/paheko-push.env");
    // Installing starts and enables nothing: the service has no configuration yet.
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        let Ok(text) = fs::read_to_string(control.path().join(script)) else {
            continue;
        };
        for forbidden in [
            "deb-systemd-invoke start",
            "systemctl start",
            "deb-systemd-helper enable",
            "systemctl enable",
        ] {
            let starts = text
                .lines()
                .filter(|l| l.contains(forbidden))
                // The helper re-enables a unit the administrator had enabled before.
                .filter(|l| !l.contains("was-enabled"))
                .count();
            let guarded = text.contains("was-enabled");
            assert!(
                starts == 0 || (forbidden == "deb-systemd-helper enable" && guarded),
                "{script} runs {forbidden:?}:\n{text}"
            );
        }
    }
    // And run: cargo-deb's postinst starts units through `deb-systemd-invoke
    // $_dh_action`, which no grep for "deb-systemd-invoke start" finds (issue 15 §5).
    let (calls, _) = run_maintainer_script(control.path(), "postinst", &["configure"]);
    let started: Vec<&str> = calls
        .lines()
        .filter(|l| {
            l.starts_with("deb-systemd-invoke start")
                || l.starts_with("deb-systemd-invoke restart")
                || l.starts_with("systemctl start")
        })
        .collect();
    assert!(
        started.is_empty(),
        "a fresh install starts {started:?}:\n{calls}"
    );
}

#[test]
fn lintian_finds_no_error_in_the_deb() {
    let Some(deb) = artifact("PAHEKO_PUSH_TEST_DEB", "the Debian package") else {
        return;
    };
    let Some(lintian) = need("lintian", "lintian") else {
        return;
    };
    let out = output(
        Command::new(lintian)
            .args(["--tag-display-limit", "0"])
            .arg(&deb),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{text}");
    // Exit status 0, or 1 for warnings only (lintian's --fail-on default is error).
    assert!(out.status.success(), "lintian {}:\n{text}", out.status);
    let _ = std::io::stderr().write_all(format!("lintian said:\n{text}").as_bytes());
}

#[test]
fn the_conffile_is_env_example_all_commented_out() {
    let Some(deb) = artifact("PAHEKO_PUSH_TEST_DEB", "the Debian package") else {
        return;
    };
    if need("dpkg-deb", "dpkg").is_none() {
        return;
    }
    let dir = extract(&deb);
    let conffile = fs::read_to_string(dir.path().join("etc/paheko-push/paheko-push.env")).unwrap();
    for line in conffile.lines().filter(|l| !l.trim().is_empty()) {
        assert!(line.starts_with('#'), "an active line: {line:?}");
    }
    // Every variable of .env.example is there, commented, with the example's value and
    // nothing after it: systemd would read "60   # why" as the value.
    let example = fs::read_to_string(Path::new(ROOT).join(".env.example")).unwrap();
    let assignments: Vec<(String, String)> = example
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .filter_map(|l| {
            let (name, rest) = l.split_once('=')?;
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit());
            valid.then(|| {
                let value = rest.split(" #").next().unwrap_or("").trim().to_string();
                (name.to_string(), value)
            })
        })
        .collect();
    assert!(assignments.len() >= 25, "{assignments:?}");
    // The secret has its own file, which the unit names: no line for it here, not even
    // commented out (uncommented, either would be an error or a trap; issue 14).
    for line in conffile.lines() {
        assert!(
            !line.contains("PAHEKO_PLUGIN_SECRET=") && !line.contains("PAHEKO_PLUGIN_SECRET_FILE="),
            "{line:?} in the conffile"
        );
    }
    for (name, value) in assignments
        .iter()
        .filter(|(name, _)| !name.starts_with("PAHEKO_PLUGIN_SECRET"))
    {
        let line = format!("# {name}={value}");
        assert!(
            conffile.lines().any(|l| l.trim_end() == line),
            "{line:?} is not a line of the conffile:\n{conffile}"
        );
    }
    assert!(conffile.contains("/etc/paheko-push/secret"), "{conffile}");
}

/// The lines of a unit from its "# Sandboxing." comment on, but the `User=` line.
fn sandbox(unit: &str) -> Vec<String> {
    let text = fs::read_to_string(Path::new(ROOT).join("scripts").join(unit)).unwrap();
    let start = text
        .find("# Sandboxing.")
        .unwrap_or_else(|| panic!("{unit}: no # Sandboxing. line"));
    text[start..]
        .lines()
        .filter(|l| !l.starts_with("User="))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_template_unit_is_the_single_unit_per_shop() {
    assert_eq!(
        sandbox("paheko-push@.service"),
        sandbox("paheko-push.service")
    );
    let template =
        fs::read_to_string(Path::new(ROOT).join("scripts/paheko-push@.service")).unwrap();
    for line in [
        "EnvironmentFile=/etc/paheko-push/%i.env",
        "LoadCredential=paheko-secret:/etc/paheko-push/%i.secret",
        "Environment=PAHEKO_PLUGIN_SECRET_FILE=%d/paheko-secret",
        "Environment=PAHEKO_PUSH_CONSUMER=%H-%i",
        "User=paheko-push-%i",
        "DynamicUser=yes",
        "Type=notify",
    ] {
        assert!(template.lines().any(|l| l == line), "{line} missing");
    }
}

#[test]
fn the_debs_binary_delivers_and_its_units_verify_and_rate_2_or_better() {
    let Some(deb) = artifact("PAHEKO_PUSH_TEST_DEB", "the Debian package") else {
        return;
    };
    if need("dpkg-deb", "dpkg").is_none() {
        return;
    }
    let dir = extract(&deb);
    let bin = dir.path().join("usr/bin/paheko-push");
    let version = succeed(Command::new(&bin).arg("--version"));
    assert_eq!(version.trim(), format!("paheko-push {VERSION}"));

    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    for sale in ["sale-1", "sale-2", "sale-3"] {
        publish_ticket(&mut conn, "cs-deb", sale);
    }
    let worker = Worker::spawn_program(&bin, &["run"], None, base_env(&redis, &sink));
    let received = sink.wait_for_count(3, T);
    let sales: Vec<String> = received.iter().map(sale_of).collect();
    assert_eq!(sales, ["sale-1", "sale-2", "sale-3"]);
    wait_until("all acknowledged", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    drop(worker);

    let units = dir.path().join("usr/lib/systemd/system");
    for unit in ["paheko-push.service", "paheko-push@.service"] {
        let text = fs::read_to_string(units.join(unit)).unwrap();
        assert!(
            text.lines()
                .any(|l| l == "ExecStart=/usr/bin/paheko-push run"),
            "{unit}:\n{text}"
        );
    }
    let Some(analyze) = need("systemd-analyze", "systemd") else {
        return;
    };
    // An instance of the template, as systemd would load it.
    fs::copy(
        units.join("paheko-push@.service"),
        units.join("paheko-push@shop1.service"),
    )
    .unwrap();
    let copies = temp("paheko-units-");
    for unit in ["paheko-push.service", "paheko-push@shop1.service"] {
        let path = units.join(unit);
        // `verify` wants ExecStart's binary where the unit says (and --root wants a
        // whole systemd tree): a copy pointing at the extracted binary.
        let copy = copies.path().join(unit);
        fs::write(
            &copy,
            fs::read_to_string(&path).unwrap().replace(
                "ExecStart=/usr/bin/paheko-push",
                &format!("ExecStart={}", bin.display()),
            ),
        )
        .unwrap();
        let verified = output(Command::new(&analyze).arg("verify").arg(&copy));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&verified.stdout),
            String::from_utf8_lossy(&verified.stderr)
        );
        assert!(
            verified.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {unit}: {}\n{said}",
            verified.status
        );
        let out = output(
            Command::new(&analyze)
                .args(["security", "--offline=true", "--no-pager"])
                .arg(&path),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let score = text
            .lines()
            .find_map(|l| {
                let rest = l
                    .split(&format!("Overall exposure level for {unit}:"))
                    .nth(1)?;
                rest.split_whitespace().next()?.parse::<f64>().ok()
            })
            .unwrap_or_else(|| {
                panic!(
                    "no exposure level for {unit} ({}):\n{text}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        assert!(score <= 2.0, "{unit}: exposure {score} > 2.0:\n{text}");
        let _ = std::io::stderr().write_all(format!("{unit}: exposure {score}\n").as_bytes());
    }
}

/// A port nothing listens on now, for a server that cannot take port 0.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

/// An empty root for the binary at `root/paheko-push`: adds what §2 allows, /etc/hosts
/// naming Redis and the plugin, and a CA bundle holding the plugin's private CA.
fn furnish(root: &Path, pki: &TestPki) {
    fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
    fs::write(
        root.join("etc/hosts"),
        format!("127.0.0.1 localhost\n127.0.0.1 {REDIS_HOST}\n127.0.0.1 {PLUGIN_HOST}\n"),
    )
    .unwrap();
    fs::copy(pki.ca_pem(), root.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
}

/// `unshare -r chroot ROOT /paheko-push ARGS`: the binary in `root`, as the only program
/// of an otherwise empty file system (same network).
struct Jail {
    unshare: PathBuf,
    chroot: PathBuf,
    root: PathBuf,
}

impl Jail {
    fn new(root: &Path) -> Option<Jail> {
        Some(Jail {
            unshare: need("unshare", "util-linux")?,
            chroot: need("chroot", "coreutils")?,
            root: root.to_path_buf(),
        })
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec![
            "-r",
            self.chroot.to_str().unwrap(),
            self.root.to_str().unwrap(),
            "/paheko-push",
        ];
        all.extend_from_slice(args);
        all
    }

    fn spawn(&self, args: &[&str], env: &[(String, String)]) -> Worker {
        Worker::spawn_program(&self.unshare, &self.args(args), None, env)
    }

    fn run(&self, args: &[&str], env: &[(String, String)]) -> Output {
        output(
            Command::new(&self.unshare)
                .args(self.args(args))
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v))),
        )
    }
}

/// The environment of a worker in the jail: Redis and the plugin by host name, the
/// plugin's CA from the root's bundle.
fn jail_env(redis_port: u16, plugin: &TlsSink) -> Vec<(String, String)> {
    [
        ("REDIS_URL", format!("redis://{REDIS_HOST}:{redis_port}/0")),
        ("PAHEKO_PLUGIN_URL", plugin.url_for(PLUGIN_HOST)),
        ("PAHEKO_PLUGIN_SECRET", SECRET.to_string()),
        (
            "PAHEKO_PLUGIN_CA_FILE",
            "/etc/ssl/certs/ca-certificates.crt".to_string(),
        ),
        ("PAHEKO_PUSH_HEALTH_ADDR", "127.0.0.1:0".to_string()),
        ("PAHEKO_PUSH_CONSUMER", "jailed".to_string()),
        ("PAHEKO_PUSH_LOG", "debug".to_string()),
        ("PAHEKO_PUSH_BACKOFF_SECONDS", "0.05".to_string()),
        ("PAHEKO_PUSH_TIMEOUT_SECONDS", "5".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Runs the binary at `root/paheko-push` in an otherwise empty root (plus /etc/hosts
/// and a CA bundle): it must deliver three tickets by host name over TLS, answer
/// `health`, and fail `check` once /etc/hosts is gone (the names came from it).
fn delivers_from_an_empty_root(root: &Path) {
    let Some(jail) = Jail::new(root) else { return };
    let pki = TestPki::generate_for(PLUGIN_HOST);
    furnish(root, &pki);
    let plugin = TlsSink::start(&pki);
    let port = free_port();
    let port_text = port.to_string();
    let redis = RedisServer::start_with(&["--port", &port_text, "--bind", "127.0.0.1"]);
    let mut conn = redis.conn();
    for sale in ["sale-1", "sale-2", "sale-3"] {
        publish_ticket(&mut conn, "cs-jail", sale);
    }
    let env = jail_env(port, &plugin);

    // No /etc/nsswitch.conf: the static glibc's defaults.
    assert!(!root.join("etc/nsswitch.conf").exists());
    let worker = jail.spawn(&["run"], &env);
    let received = plugin.wait_for_count(3, T);
    let sales: Vec<String> = received.iter().map(sale_of).collect();
    assert_eq!(sales, ["sale-1", "sale-2", "sale-3"]);
    assert_eq!(received[0].header("x-paheko-secret"), Some(SECRET));
    wait_until("all acknowledged", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    let addr = worker.health_addr();
    let health = env_with(env.clone(), [("PAHEKO_PUSH_HEALTH_ADDR", addr.as_str())]);
    let probed = jail.run(&["health"], &health);
    let said = String::from_utf8_lossy(&probed.stdout).into_owned();
    assert!(
        probed.status.success() && said.starts_with("healthy: redis ok, paheko up"),
        "health ({}): {said}{}",
        probed.status,
        String::from_utf8_lossy(&probed.stderr)
    );
    drop(worker);

    // With an nsswitch.conf saying "files": the same.
    fs::write(root.join("etc/nsswitch.conf"), "hosts: files\n").unwrap();
    let checked = jail.run(&["check"], &env);
    let text = String::from_utf8_lossy(&checked.stdout).into_owned();
    assert!(
        checked.status.success(),
        "check with nsswitch.conf:\n{text}"
    );

    // Without /etc/hosts the names do not resolve: they came from that file.
    fs::remove_file(root.join("etc/nsswitch.conf")).unwrap();
    fs::remove_file(root.join("etc/hosts")).unwrap();
    let checked = jail.run(&["check"], &env);
    let text = String::from_utf8_lossy(&checked.stdout).into_owned();
    assert_eq!(checked.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL  plugin") && l.contains("does not resolve")),
        "{text}"
    );
}

#[test]
fn the_static_binary_is_static_and_delivers_by_host_name_from_an_empty_root() {
    let Some(bin) = artifact("PAHEKO_PUSH_TEST_STATIC", "the static binary") else {
        return;
    };
    let (Some(file), Some(ldd)) = (need("file", "file"), need("ldd", "libc-bin")) else {
        return;
    };
    let said = succeed(Command::new(file).arg("-L").arg(&bin));
    assert!(
        said.contains("statically linked") || said.contains("static-pie linked"),
        "{said}"
    );
    let out = output(Command::new(ldd).arg(&bin));
    let ldd_said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        ldd_said.contains("statically linked") || ldd_said.contains("not a dynamic executable"),
        "{ldd_said}"
    );
    let root = temp("paheko-static-root-");
    fs::copy(&bin, root.path().join("paheko-push")).unwrap();
    delivers_from_an_empty_root(root.path());
}

/// The image's files: `podman save`, then its layers unpacked in order.
fn image_root(podman: &Path, image: &str) -> tempfile::TempDir {
    let work = temp("paheko-image-");
    let archive = work.path().join("image.tar");
    succeed(
        Command::new(podman)
            .args(["save", "--quiet", "--format", "docker-archive", "-o"])
            .arg(&archive)
            .arg(image),
    );
    let unpacked = work.path().join("archive");
    fs::create_dir(&unpacked).unwrap();
    succeed(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&unpacked),
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(unpacked.join("manifest.json")).unwrap()).unwrap();
    let root = temp("paheko-image-root-");
    let layers = manifest[0]["Layers"]
        .as_array()
        .expect("Layers in manifest.json");
    for layer in layers {
        let layer = unpacked.join(layer.as_str().unwrap());
        succeed(
            Command::new("tar")
                .arg("-xf")
                .arg(&layer)
                .arg("-C")
                .arg(root.path()),
        );
    }
    root
}

/// Every file and directory under `root`, relative, sorted.
fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().display().to_string());
            if path.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn the_image_is_the_static_binary_alone_and_runs_from_its_exported_root() {
    let Some(image) = artifact("PAHEKO_PUSH_TEST_IMAGE", "the container image") else {
        return;
    };
    let Some(podman) = need("podman", "podman") else {
        return;
    };
    let inspect = succeed(Command::new(&podman).args(["image", "inspect"]).arg(&image));
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let config = &inspect[0]["Config"];
    // Starts as root to read a root-only secret, then runs as 65532 (issue 14 §1).
    assert_eq!(config["User"], "0:0", "{config}");
    assert!(
        config["Env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|v| v == "PAHEKO_PUSH_RUN_AS=65532:65532")),
        "{config}"
    );
    assert_eq!(config["Entrypoint"], serde_json::json!(["/paheko-push"]));
    assert_eq!(config["Cmd"], serde_json::json!(["run"]));
    assert_eq!(
        inspect[0]["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "/paheko-push", "health"]),
        "{inspect}"
    );
    let _ = std::io::stderr()
        .write_all(format!("image {image}: {} bytes\n", inspect[0]["Size"]).as_bytes());

    let root = image_root(&podman, &image);
    let files = tree(root.path());
    let expected = ["etc", "etc/passwd", "paheko-push", "run", "run/paheko-push"];
    assert!(
        files.iter().all(|f| expected.contains(&f.as_str()))
            && files.contains(&"paheko-push".to_string()),
        "the image holds more than the program: {files:?}"
    );
    delivers_from_an_empty_root(root.path());
}

/// The `KEY: value` pairs of `section:` under the paheko-push service of compose.yaml
/// (indented map entries, quotes removed), or the list items for a list section.
fn compose_section(compose: &str, section: &str) -> Vec<(String, String)> {
    let mut lines = compose
        .lines()
        .skip_while(|l| l.trim() != format!("{section}:"));
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let indent = header.len() - header.trim_start().len();
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let l = l.strip_prefix("- ").unwrap_or(l);
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            (k.trim().to_string(), v.trim().trim_matches('"').to_string())
        })
        .collect()
}

#[test]
fn the_compose_service_runs_the_image_with_an_environment_it_accepts() {
    let compose = fs::read_to_string(Path::new(ROOT).join("deploy/compose.yaml")).unwrap();
    let line = |prefix: &str| {
        compose
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in compose.yaml"))
            .to_string()
    };
    assert_eq!(
        line("image:"),
        format!("image: localhost/paheko-push:{VERSION}")
    );
    assert_eq!(line("restart:"), "restart: unless-stopped");
    // The image's healthcheck applies: podman-compose 1.0 runs one declared here
    // through /bin/sh, which the image does not have (issue 14 §9).
    assert!(!compose.lines().any(|l| l.trim() == "healthcheck:"));
    assert_eq!(line("file:"), "file: ./paheko_push_secret.txt");
    assert_eq!(line("cap_add:"), "cap_add: [SETUID, SETGID]");
    assert_eq!(line("external:"), "external: true");
    assert_eq!(line("name:"), "name: recyclic-network");
    let env = compose_section(&compose, "environment");
    let get = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{name} not in the environment: {env:?}"))
    };
    assert_eq!(get("REDIS_URL"), "redis://redis:6379/0");
    assert_eq!(get("PAHEKO_PLUGIN_URL"), "http://paheko/p/recyclique/");
    assert_eq!(get("PAHEKO_PUSH_ALLOW_HTTP"), "true");
    assert_eq!(
        get("PAHEKO_PLUGIN_SECRET_FILE"),
        "/run/secrets/paheko_push_secret"
    );
    assert!(!env.iter().any(|(k, _)| k == "PAHEKO_PLUGIN_SECRET"));

    // The image's binary accepts that environment: with the secret where compose
    // mounts it, `check` finds no configuration error (exit 2) and fails only on the
    // compose network's names, which do not exist here.
    let Some(image) = artifact("PAHEKO_PUSH_TEST_IMAGE", "the container image") else {
        return;
    };
    let Some(podman) = need("podman", "podman") else {
        return;
    };
    assert_eq!(image, format!("localhost/paheko-push:{VERSION}"));
    let root = image_root(&podman, &image);
    let Some(jail) = Jail::new(root.path()) else {
        return;
    };
    fs::create_dir_all(root.path().join("run/secrets")).unwrap();
    fs::write(
        root.path().join("run/secrets/paheko_push_secret"),
        "compose-secret\n",
    )
    .unwrap();
    let checked = jail.run(&["check"], &env);
    let text = String::from_utf8_lossy(&checked.stdout).into_owned();
    assert_eq!(checked.status.code(), Some(1), "{text}{:?}", checked);
    assert!(text.starts_with("ok    configuration"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL  redis") && l.contains("redis://redis:6379/0")),
        "{text}"
    );
}

/// The image's configuration as `podman image inspect` gives it: (User, Env).
fn image_config(podman: &Path, image: &str) -> (String, Vec<(String, String)>) {
    let inspect = succeed(Command::new(podman).args(["image", "inspect"]).arg(image));
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let config = &inspect[0]["Config"];
    let env = config["Env"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|v| v.as_str()?.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    (config["User"].as_str().unwrap_or("").to_string(), env)
}

/// `/proc/PID/status`'s line `name`, its fields after the name.
fn proc_status(pid: u32, name: &str) -> Vec<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The program and arguments that run `/paheko-push ARGS` from `root` as the image
/// says and as compose starts it: as the image's user, and for root with only the
/// capabilities deploy/compose.yaml keeps (SETUID, SETGID; SYS_CHROOT too, for the
/// chroot standing in for the container) and no-new-privileges.
fn as_the_image_runs(user: &str, root: &Path, args: &[&str]) -> Option<(PathBuf, Vec<String>)> {
    let chroot = need("chroot", "coreutils")?;
    let mut argv: Vec<String> = Vec::new();
    let program = if user == "0:0" || user == "0" || user.is_empty() {
        argv.extend(
            [
                "--no-new-privs",
                "--inh-caps=-all",
                "--bounding-set=-all,+setuid,+setgid,+sys_chroot",
            ]
            .map(String::from),
        );
        argv.push(chroot.display().to_string());
        need("setpriv", "util-linux")?
    } else {
        argv.push(format!("--userspec={user}"));
        chroot
    };
    argv.push(root.display().to_string());
    argv.push("/paheko-push".into());
    argv.extend(args.iter().map(|a| a.to_string()));
    Some((program, argv))
}

/// Issue 14 §1: compose mounts the secret file as it is on the host, root's and mode
/// 0600 (the README's umask 077) or 0400, and applies no uid or mode to it. The image,
/// run from its exported root as compose would start it, must read it, deliver with
/// it, and by then run as 65532:65532 with no capability left; its HEALTHCHECK command
/// too. A file of another owner fails with a message saying what to do.
#[test]
fn the_image_reads_a_root_only_compose_secret_then_runs_as_65532() {
    let Some(image) = artifact("PAHEKO_PUSH_TEST_IMAGE", "the container image") else {
        return;
    };
    let Some(podman) = need("podman", "podman") else {
        return;
    };
    // SAFETY: geteuid takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip("the compose secret test: it needs root, to own the secret as root and run as 65532");
        return;
    }
    let (user, image_env) = image_config(&podman, &image);
    let root = image_root(&podman, &image);
    fs::create_dir_all(root.path().join("run/secrets")).unwrap();
    let secret = root.path().join("run/secrets/paheko_push_secret");
    let compose = fs::read_to_string(Path::new(ROOT).join("deploy/compose.yaml")).unwrap();
    let port = free_port();
    let redis = RedisServer::start_with(&["--port", &port.to_string(), "--bind", "127.0.0.1"]);
    let sink = Sink::ok();
    let mut conn = redis.conn();
    // The image's environment, then compose's, then what this machine needs instead
    // of compose's network names (and a free health port).
    let mut env: Vec<(String, String)> =
        image_env.into_iter().filter(|(k, _)| k != "PATH").collect();
    env = env_with(env, compose_section(&compose, "environment"));
    let redis_url = format!("redis://127.0.0.1:{port}/0");
    env = env_with(
        env,
        [
            ("REDIS_URL", redis_url.as_str()),
            ("PAHEKO_PLUGIN_URL", sink.url().as_str()),
            ("PAHEKO_PUSH_HEALTH_ADDR", "127.0.0.1:0"),
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "0.05"),
        ],
    );
    assert!(
        env.iter().any(
            |(k, v)| k == "PAHEKO_PLUGIN_SECRET_FILE" && v == "/run/secrets/paheko_push_secret"
        )
    );

    for mode in [0o600, 0o400] {
        let written = format!("compose-secret-{mode:o}");
        fs::write(&secret, format!("{written}\n")).unwrap();
        std::os::unix::fs::chown(&secret, Some(0), Some(0)).unwrap();
        fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        let sale = format!("sale-{mode:o}");
        publish_ticket(&mut conn, "cs-compose", &sale);
        let Some((program, args)) = as_the_image_runs(&user, root.path(), &["run"]) else {
            return;
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let worker = Worker::spawn_program(&program, &args, None, &env);
        let delivered = wait_for("the ticket delivered with the file's secret", T, || {
            sink.received().into_iter().find(|r| sale_of(r) == sale)
        });
        assert_eq!(delivered.header("x-paheko-secret"), Some(written.as_str()));
        // The process that delivered: no longer root, no capability, no group.
        let pid = worker.pid();
        assert_eq!(proc_status(pid, "Uid"), ["65532"; 4], "mode {mode:o}");
        assert_eq!(proc_status(pid, "Gid"), ["65532"; 4], "mode {mode:o}");
        assert!(proc_status(pid, "Groups").is_empty(), "mode {mode:o}");
        assert_eq!(proc_status(pid, "CapEff"), ["0000000000000000"]);
        assert_eq!(proc_status(pid, "CapPrm"), ["0000000000000000"]);

        // The HEALTHCHECK's command, run the same way beside it.
        let addr = worker.health_addr();
        let health = env_with(env.clone(), [("PAHEKO_PUSH_HEALTH_ADDR", addr.as_str())]);
        let (program, args) = as_the_image_runs(&user, root.path(), &["health"]).unwrap();
        let probed = output(
            Command::new(&program)
                .args(&args)
                .env_clear()
                .envs(health.iter().map(|(k, v)| (k, v))),
        );
        assert!(
            probed.status.success(),
            "health, secret mode {mode:o}: {probed:?}"
        );
        drop(worker);
    }

    // Another owner's file (a non-root administrator's, with rootful Docker): the
    // worker cannot read it without capabilities, and says what to do.
    std::os::unix::fs::chown(&secret, Some(1000), Some(1000)).unwrap();
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (program, args) = as_the_image_runs(&user, root.path(), &["check"]).unwrap();
    let checked = output(
        Command::new(&program)
            .args(&args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v))),
    );
    let said = String::from_utf8_lossy(&checked.stderr);
    assert_eq!(checked.status.code(), Some(2), "{checked:?}");
    assert!(
        said.contains("PAHEKO_PLUGIN_SECRET_FILE")
            && said.contains("Permission denied")
            && said.contains("must belong to root"),
        "{said}"
    );
}

/// The commands of the README's fenced shell blocks, one per line, comments removed.
fn readme_commands() -> Vec<String> {
    let readme = fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let mut out = Vec::new();
    let mut in_shell = false;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_shell = !in_shell && line.trim() == "```sh";
            continue;
        }
        if in_shell {
            let command = line.split(" # ").next().unwrap_or("").trim();
            if !command.is_empty() && !command.starts_with('#') {
                out.push(command.to_string());
            }
        }
    }
    out
}

/// Issue 14 §3: `podman build` as the README writes it keeps the HEALTHCHECK (podman's
/// default OCI format has none). Built here with the README's words, a test tag aside.
#[test]
fn the_readmes_podman_build_keeps_the_healthcheck() {
    let Some(static_bin) = artifact("PAHEKO_PUSH_TEST_STATIC", "the static binary") else {
        return;
    };
    let Some(podman) = need("podman", "podman") else {
        return;
    };
    assert!(
        Path::new(ROOT)
            .join("target/x86_64-unknown-linux-gnu/release/paheko-push")
            .canonicalize()
            .ok()
            == Path::new(&static_bin).canonicalize().ok(),
        "the Containerfile copies target/x86_64-unknown-linux-gnu/release/paheko-push"
    );
    let builds: Vec<String> = readme_commands()
        .into_iter()
        .filter(|c| c.starts_with("podman build"))
        .collect();
    assert!(!builds.is_empty(), "the README names no podman build");
    for build in builds {
        let tag = format!("localhost/paheko-push-readme-test:{}", std::process::id());
        let words: Vec<String> = build
            .split_whitespace()
            .map(|w| {
                if w.starts_with("localhost/paheko-push:") {
                    tag.clone()
                } else {
                    w.to_string()
                }
            })
            .collect();
        assert!(
            words.contains(&tag),
            "{build}: no localhost/paheko-push tag"
        );
        let built = output(Command::new(&podman).args(&words[1..]).current_dir(ROOT));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&built.stdout),
            String::from_utf8_lossy(&built.stderr)
        );
        let inspect = output(Command::new(&podman).args(["image", "inspect", &tag]));
        let _ = output(Command::new(&podman).args(["rmi", "--force", &tag]));
        assert!(built.status.success(), "{build}:\n{said}");
        let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
        assert_eq!(
            inspect[0]["Healthcheck"]["Test"],
            serde_json::json!(["CMD", "/paheko-push", "health"]),
            "{build} built an image without the HEALTHCHECK:\n{said}"
        );
    }
}

/// Issue 14 §4: the README's `apt install ./…deb` names the file scripts/package built,
/// from the repository's root where the README's commands run.
#[test]
fn the_readmes_apt_install_names_the_package_scripts_package_builds() {
    let Some(deb) = artifact("PAHEKO_PUSH_TEST_DEB", "the Debian package") else {
        return;
    };
    let installs: Vec<String> = readme_commands()
        .into_iter()
        .filter(|c| c.starts_with("apt install "))
        .collect();
    assert!(!installs.is_empty(), "the README has no apt install");
    for install in installs {
        let path = install.split_whitespace().nth(2).unwrap();
        assert!(path.starts_with("./"), "{install}: apt needs ./ for a file");
        assert_eq!(
            Path::new(ROOT).join(path).canonicalize().ok(),
            Path::new(&deb).canonicalize().ok(),
            "{install}"
        );
    }
}

/// The package's maintainer scripts, run as dpkg would (`prerm remove`, `postrm
/// purge`, `postinst configure OLD`) in a mount namespace whose /etc and /run are
/// empty tmpfs: /etc/paheko-push as an administrator left it, systemd running, and
/// stand-ins for systemctl and the debhelper tools that record their arguments.
/// Returns what they recorded and the files left in /etc.
fn run_maintainer_script(control: &Path, script: &str, args: &[&str]) -> (String, Vec<String>) {
    let Some(unshare) = need("unshare", "util-linux") else {
        return (String::new(), Vec::new());
    };
    let fake = temp("paheko-fake-bin-");
    let record = fake.path().join("calls");
    for tool in ["systemctl", "deb-systemd-helper", "deb-systemd-invoke"] {
        let path = fake.path().join(tool);
        fs::write(
            &path,
            format!("#!/bin/sh\necho \"{tool} $*\" >> {}\n", record.display()),
        )
        .unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let setup = r#"set -e
mount -t tmpfs tmpfs /etc
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/system /etc/paheko-push /etc/systemd/system/multi-user.target.wants
for f in paheko-push.env secret shop1.env shop1.secret; do echo x > /etc/paheko-push/$f; done
ln -s /usr/lib/systemd/system/paheko-push@.service \
  /etc/systemd/system/multi-user.target.wants/paheko-push@shop1.service
ln -s /usr/lib/systemd/system/paheko-push.service \
  /etc/systemd/system/multi-user.target.wants/paheko-push.service
# The debhelper snippets test for these tools at their absolute paths.
PATH="$FAKE:$PATH" sh -e "$SCRIPT" "$@"
find /etc -mindepth 1 | sort > "$FAKE/left"
"#;
    let out = output(
        Command::new(unshare)
            .args(["-r", "-m", "sh", "-c", setup, "sh"])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("FAKE", fake.path())
            .env("SCRIPT", control.join(script)),
    );
    assert!(out.status.success(), "{script} {args:?}: {out:?}");
    let calls = fs::read_to_string(&record).unwrap_or_default();
    let left = fs::read_to_string(fake.path().join("left"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    (calls, left)
}

/// Issue 14 §6 and §8: removing the package stops the per-shop instances too; purging
/// it removes /etc/paheko-push, the secret and the shops' files included, and the
/// links that enabled its units; an upgrade restarts the running instances.
#[test]
fn remove_stops_every_instance_and_purge_leaves_nothing_in_etc() {
    let Some(deb) = artifact("PAHEKO_PUSH_TEST_DEB", "the Debian package") else {
        return;
    };
    if need("dpkg-deb", "dpkg").is_none() {
        return;
    }
    let control = temp("paheko-deb-scripts-");
    succeed(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb)
            .arg(control.path()),
    );

    let (calls, left) = run_maintainer_script(control.path(), "prerm", &["remove"]);
    if left.is_empty() {
        return;
    }
    assert!(
        calls
            .lines()
            .any(|l| l == "systemctl stop paheko-push@*.service"),
        "prerm remove did not stop the instances:\n{calls}"
    );
    assert!(
        calls
            .lines()
            .any(|l| l.contains("stop") && l.contains("paheko-push.service")),
        "prerm remove did not stop paheko-push.service:\n{calls}"
    );
    assert!(
        left.contains(&"/etc/paheko-push/secret".to_string()),
        "{left:?}"
    );

    let (calls, left) = run_maintainer_script(control.path(), "postrm", &["remove"]);
    assert!(
        left.contains(&"/etc/paheko-push/secret".to_string()),
        "remove is not purge: {left:?}\n{calls}"
    );

    let (calls, left) = run_maintainer_script(control.path(), "postrm", &["purge"]);
    let ours: Vec<&String> = left.iter().filter(|p| p.contains("paheko-push")).collect();
    assert!(ours.is_empty(), "purge left {ours:?}\n{calls}");

    let (calls, _) = run_maintainer_script(control.path(), "postinst", &["configure", "0.0.9-1"]);
    assert!(
        calls
            .lines()
            .any(|l| l == "systemctl try-restart paheko-push@*.service"),
        "an upgrade does not restart the instances:\n{calls}"
    );
    let (calls, _) = run_maintainer_script(control.path(), "postinst", &["configure"]);
    assert!(
        !calls.contains("restart") && !calls.contains("start paheko"),
        "a first installation started something:\n{calls}"
    );
}

/// Issue 14 §9: deploy/compose.yaml is valid against the Compose specification's JSON
/// schema (the one Debian's docker-compose package ships), Docker Compose reads it,
/// and podman-compose turns it into a `podman run` on RecyClique's network, with the
/// image's own exec-form healthcheck (no /bin/sh -c), SETUID and SETGID only.
#[test]
fn the_compose_file_is_valid_and_podman_compose_runs_it_on_recycliques_network() {
    const SCHEMA: &str = "/usr/lib/python3/dist-packages/compose/config/compose_spec.json";
    // Debian's python3 (the jsonschema and yaml modules are its packages).
    let python = if Path::new("/usr/bin/python3").is_file() {
        PathBuf::from("/usr/bin/python3")
    } else {
        let Some(p) = need("python3", "python3") else {
            return;
        };
        p
    };
    if !Path::new(SCHEMA).is_file() {
        skip(&format!(
            "{SCHEMA} is missing (scripts/test installs the docker-compose package)"
        ));
        return;
    }
    let project = temp("paheko-compose-");
    fs::copy(
        Path::new(ROOT).join("deploy/compose.yaml"),
        project.path().join("compose.yaml"),
    )
    .unwrap();
    fs::write(project.path().join("paheko_push_secret.txt"), "x").unwrap();
    let validated = output(
        Command::new(&python)
            .args([
                "-c",
                "import json, sys, yaml, jsonschema\n\
                 schema = json.load(open(sys.argv[1]))\n\
                 jsonschema.validate(yaml.safe_load(open(sys.argv[2])), schema)\n\
                 print('valid against', schema['title'], schema.get('$schema'))",
                SCHEMA,
            ])
            .arg(project.path().join("compose.yaml")),
    );
    assert!(validated.status.success(), "{validated:?}");

    if let Some(compose) = need("docker-compose", "docker-compose") {
        let config = output(
            Command::new(compose)
                .args(["-f", "compose.yaml", "config"])
                .current_dir(project.path()),
        );
        assert!(config.status.success(), "{config:?}");
    }

    let Some(podman_compose) = need("podman-compose", "podman-compose") else {
        return;
    };
    // A stand-in for podman: says the external network exists and records the rest.
    let fake = project.path().join("podman");
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\n",
            project.path().join("podman-calls").display()
        ),
    )
    .unwrap();
    fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let up = output(
        Command::new(podman_compose)
            .arg("--podman-path")
            .arg(&fake)
            .args(["--dry-run", "-f", "compose.yaml", "up", "-d"])
            .current_dir(project.path()),
    );
    let said = String::from_utf8_lossy(&up.stdout).into_owned();
    assert!(up.status.success(), "{up:?}");
    let run = said
        .lines()
        .find(|l| l.contains(" run ") && l.contains("localhost/paheko-push:"))
        .unwrap_or_else(|| panic!("no podman run:\n{said}"));
    for part in [
        "--net recyclic-network",
        "--cap-drop ALL",
        "--cap-add SETUID",
        "--cap-add SETGID",
        "--read-only",
        "--security-opt no-new-privileges:true",
        "paheko_push_secret.txt:/run/secrets/paheko_push_secret:ro",
    ] {
        assert!(run.contains(part), "{part} missing: {run}");
    }
    assert!(!run.contains("--healthcheck-command"), "{run}");
}

/// Issue 14: the plugin's path was /push in one file and /push.php in another. The
/// real plugin answers at /p/recyclique/; every example says so.
#[test]
fn the_plugin_url_is_the_same_in_every_example() {
    for file in [
        ".env.example",
        "deploy/compose.yaml",
        "docs/systemd.md",
        "README.md",
    ] {
        let text = fs::read_to_string(Path::new(ROOT).join(file)).unwrap();
        assert!(text.contains("/p/recyclique/"), "{file}");
        for other in ["push.php", "/p/recyclique/push"] {
            assert!(!text.contains(other), "{file} says {other}");
        }
    }
    let example = fs::read_to_string(Path::new(ROOT).join(".env.example")).unwrap();
    assert!(
        example
            .lines()
            .any(|l| l == "PAHEKO_PLUGIN_URL=https://paheko.example.org/p/recyclique/"),
        "{example}"
    );
}
