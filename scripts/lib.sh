# Shared by the scripts: installs what they need when it is missing.

# redis-server (and redis-cli) from the system's packages.
ensure_redis() {
  if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    return
  fi
  echo "redis-server is missing: installing it from the system packages" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
  elif command -v dnf >/dev/null 2>&1; then
    $sudo dnf install -y -q redis
  elif command -v apk >/dev/null 2>&1; then
    $sudo apk add --quiet redis
  else
    echo "no known package manager: install redis-server by hand" >&2
    return 1
  fi
}
