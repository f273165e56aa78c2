#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for Corral's tests and benchmarks (Debian's `postgresql` package).
#
#   scripts/pg-test-cluster.sh start [DIR] [--no-fsync] [--ssl]
#                                                         start one in DIR (default: a new temp
#                                                         dir); print its URL on stdout
#   scripts/pg-test-cluster.sh stop DIR                   stop it and delete DIR
#
# `start` on a DIR whose cluster runs already prints its URL again (tests share one cluster this
# way; concurrent starts serialize on DIR.lock). Listens on 127.0.0.1 only, on a free port, with
# trust authentication for the role `corral`. initdb refuses to run as root: as root the cluster
# runs as the `postgres` user (created by the package), or a `corral-pg` user made here.
# --no-fsync: fsync off (tests only: they kill coordinators, never the database); benchmarks keep
# it on.
# --ssl: TLS only. `openssl` makes a throwaway CA (DIR/ssl/ca.crt, the file for `sslrootcert`) and
# a server certificate it signs for `localhost`, `db.corral.test` and 127.0.0.1; the server runs
# with ssl=on and a pg_hba.conf that accepts TCP connections over TLS only (`hostssl`), so a
# plaintext client is refused.
set -euo pipefail

cmd="${1:-}"
shift || true
dir=""
fsync=on
ssl=off
for a in "$@"; do
  case "$a" in
    --no-fsync) fsync=off ;;
    --ssl) ssl=on ;;
    *) dir="$a" ;;
  esac
done

bindir() {
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(command -v pg_ctl)"
    return
  fi
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
  if [[ -z "$d" || ! -x "$d/initdb" ]]; then
    echo "pg-test-cluster: no PostgreSQL server binaries (apt-get install postgresql)" >&2
    exit 3
  fi
  echo "$d"
}

# Runs a command as the cluster's owner.
as_owner() {
  if [[ "$(id -u)" != 0 ]]; then
    "$@"
  elif command -v runuser >/dev/null; then
    runuser -u "$owner" -- "$@"
  else
    su "$owner" -s /bin/sh -c "$(printf '%q ' "$@")"
  fi
}

pick_owner() {
  owner="$(id -un)"
  if [[ "$(id -u)" == 0 ]]; then
    if id postgres >/dev/null 2>&1; then
      owner=postgres
    else
      id corral-pg >/dev/null 2>&1 || useradd --system --no-create-home corral-pg
      owner=corral-pg
    fi
  fi
}

url_of() {
  echo "postgres://corral@127.0.0.1:$(cat "$1/port")/postgres"
}

running() {
  [[ -f "$1/port" ]] && as_owner "$bin/pg_ctl" -D "$1/data" status >/dev/null 2>&1
}

# A CA and a server certificate signed by it, in $1/ssl; the key readable by the owner only, as the
# server demands.
make_certs() {
  local d="$1/ssl"
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=corral test CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$d/ca.key" -out "$d/ca.crt" >/dev/null 2>&1
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$d/server.key" -out "$d/server.csr" >/dev/null 2>&1
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,DNS:db.corral.test,IP:127.0.0.1" \
    >"$d/server.ext"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 2 -extfile "$d/server.ext" -out "$d/server.crt" >/dev/null 2>&1
  chmod 600 "$d/server.key" "$d/ca.key"
  [[ "$(id -u)" == 0 ]] && chown -R "$owner" "$d"
  return 0
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "$cmd" in
  start)
    bin="$(bindir)"
    pick_owner
    if [[ -z "$dir" ]]; then
      dir="$(mktemp -d "${TMPDIR:-/tmp}/corral-pg.XXXXXX")"
    fi
    mkdir -p "$dir"
    exec 9>"$dir.lock"
    flock 9
    if running "$dir"; then
      url_of "$dir"
      exit 0
    fi
    rm -rf "$dir/data" "$dir/port"
    chmod 755 "$dir"
    [[ "$(id -u)" == 0 ]] && chown "$owner" "$dir"
    if [[ "$(id -u)" == 0 ]] && ! as_owner test -x "$dir"; then
      # The owner must reach DIR (a checkout under a private directory, a mktemp -d): let others
      # traverse, not list, the directories above it.
      p="$(cd "$dir" && pwd)"
      while [[ "$p" != / ]]; do chmod o+x "$p"; p="$(dirname "$p")"; done
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U corral --auth=trust -E UTF8 --locale=C --no-sync \
      >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    ssl_opts=""
    if [[ "$ssl" == on ]]; then
      command -v openssl >/dev/null || { echo "pg-test-cluster: --ssl needs openssl" >&2; exit 3; }
      make_certs "$dir" || { echo "pg-test-cluster: openssl could not make the certificates" >&2; exit 1; }
      ssl_opts="-c ssl=on -c ssl_cert_file='$dir/ssl/server.crt' -c ssl_key_file='$dir/ssl/server.key'"
      # TCP over TLS only: no `host` (TLS or not) or `hostnossl` line.
      printf '%s\n' "local all all trust" "hostssl all all 127.0.0.1/32 trust" \
        "hostssl all all ::1/128 trust" >"$dir/data/pg_hba.conf"
    fi
    # The port is picked, then bound by the server: retry if another process took it meanwhile.
    for _ in 1 2 3 4 5; do
      port="$(free_port)"
      # 9>&-: the server must not inherit (and hold) the lock.
      if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 start 9>&- -o \
        "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories='$dir' \
         -c max_connections=500 -c fsync=$fsync -c full_page_writes=$fsync \
         -c shared_buffers=128MB $ssl_opts" >/dev/null 2>&1; then
        echo "$port" >"$dir/port"
        url_of "$dir"
        exit 0
      fi
    done
    echo "pg-test-cluster: the server did not start; its log:" >&2
    cat "$dir/server.log" >&2 || true
    exit 1
    ;;
  stop)
    [[ -n "$dir" ]] || { echo "usage: $0 stop DIR" >&2; exit 2; }
    bin="$(bindir)"
    pick_owner
    if [[ -d "$dir/data" ]]; then
      as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir" "$dir.lock"
    ;;
  *)
    echo "usage: $0 start [DIR] [--no-fsync] [--ssl] | stop DIR" >&2
    exit 2
    ;;
esac
