#!/bin/sh
# berth-postgres's entrypoint (busybox sh): creates the cluster on the first start into an empty
# volume, then runs the server in the foreground (exec: it is PID 1 and gets docker's signals).
#
# First start: initdb into $PGDATA.init, then the role and the database in single-user mode, then
# a rename to $PGDATA, so that a start killed half-way leaves no cluster that looks finished (the
# next start begins again). The superuser `postgres` and the owner of the database (POSTGRES_USER,
# default berth) get the same password; the orchestrator connects as the owner, not as a
# superuser. Every connection, over TCP or the socket, asks for it (scram-sha-256).
#
# Env: POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE (one is needed for the first start),
#   POSTGRES_USER (berth), POSTGRES_DB (berth), PGDATA (/var/lib/postgresql/15/main).
# Arguments are passed to postgres (`-c name=value` …).
set -eu

PGBIN=/usr/lib/postgresql/15/bin
PGDATA=${PGDATA:-/var/lib/postgresql/15/main}
USER_NAME=${POSTGRES_USER:-berth}
DB_NAME=${POSTGRES_DB:-berth}

fail() {
  echo "berth-postgres: $*" >&2
  exit 1
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  password=${POSTGRES_PASSWORD:-}
  if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    [ -r "$POSTGRES_PASSWORD_FILE" ] || fail "POSTGRES_PASSWORD_FILE $POSTGRES_PASSWORD_FILE cannot be read"
    password=$(cat "$POSTGRES_PASSWORD_FILE")
  fi
  [ -n "$password" ] || fail "no password for the new cluster in $PGDATA: set POSTGRES_PASSWORD \
(compose: BERTH_POSTGRES_PASSWORD) or POSTGRES_PASSWORD_FILE"
  case $password in
    *"
"*) fail "the password holds a line break: initdb reads only its first line" ;;
  esac
  case $USER_NAME$DB_NAME in
    *[!A-Za-z0-9_]*) fail "POSTGRES_USER and POSTGRES_DB may hold only letters, digits and _" ;;
  esac
  [ "$USER_NAME" != postgres ] || fail "POSTGRES_USER must not be postgres (the superuser)"

  echo "berth-postgres: creating the cluster in $PGDATA (user $USER_NAME, database $DB_NAME)" >&2
  rm -rf "$PGDATA.init"
  umask 077
  # The password through a pipe, never in a file. C locale: the image has no locale files; UTF8
  # is the encoding every berth text is in. initdb still looks for locales with `locale -a` and
  # says it found none ("sh: locale: not found", "no usable system locales"): harmless.
  printf '%s\n' "$password" |
    "$PGBIN/initdb" -D "$PGDATA.init" -U postgres --pwfile=/dev/stdin --auth=scram-sha-256 \
      --encoding=UTF8 --locale=C >/dev/null
  # initdb lets in 127.0.0.1 and ::1 only; the orchestrators come over the compose network.
  printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' \
    >>"$PGDATA.init/pg_hba.conf"
  quoted=$(printf '%s' "$password" | sed "s/'/''/g")
  # Single-user mode: no server listens while the role and the database are made.
  printf "CREATE ROLE %s LOGIN PASSWORD '%s';\nCREATE DATABASE %s OWNER %s;\n" \
    "$USER_NAME" "$quoted" "$DB_NAME" "$USER_NAME" |
    "$PGBIN/postgres" --single -D "$PGDATA.init" -c jit=off postgres >/dev/null
  mv "$PGDATA.init" "$PGDATA"
  echo "berth-postgres: cluster created" >&2
fi

# TCP only, no unix socket: the root is read-only, Debian's socket directory is not there, and
# docker does not always give a tmpfs the mode asked for (seen: /tmp 0755 root under
# --tmpfs /tmp:mode=1777). No JIT: llvmjit.so (and its 100 MB of LLVM) is left out of the image.
exec "$PGBIN/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories= \
  -c jit=off "$@"
