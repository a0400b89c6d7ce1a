#!/usr/bin/env bash
# Samples every table's rows and total size (heap + indexes + TOAST) and the
# Kafka log directory's size every $EVERY seconds, as CSV on stdout:
#   at,table,rows,bytes
# Usage: bench/scripts/table_sizes.sh DATABASE_URL KAFKA_LOG_DIR [EVERY] [COUNT]
set -euo pipefail
db="$1"; kafka_dir="$2"; every="${3:-60}"; count="${4:-1000000}"
echo "at,table,rows,bytes"
for _ in $(seq "$count"); do
  at=$(date -u +%FT%TZ)
  psql "$db" -AtF, -c "SELECT '$at', relname, n_live_tup, pg_total_relation_size(relid) FROM pg_stat_user_tables WHERE schemaname = 'public' ORDER BY 4 DESC"
  echo "$at,kafka_log_dir,,$(du -sb "$kafka_dir" | cut -f1)"
  sleep "$every"
done
