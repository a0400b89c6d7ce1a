#!/usr/bin/env python3
"""Writes HomeLink's Grafana dashboard (homelink-overview.json) and the panel
reference (README.md) from one description, so they cannot disagree.

    python3 infra/grafana/generate.py          # rewrite both files
    python3 infra/grafana/generate.py --check  # fail when they are out of date (the test suite runs this)

Every query here is run against a live test stack's Prometheus by
e2e/tests/operations.rs, which fails when one errors or names a metric no
service exports. `$__rate_interval` is Grafana's; the test reads it as 1m.
"""
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
RI = "$__rate_interval"

SERVICES = [("command_api", "command API"), ("query_api", "query API"), ("bridge", "device bridge"),
            ("projector", "projector"), ("automation", "automation engine")]
HTTP = [("command_api", "command API"), ("query_api", "query API")]
CONSUMERS = [("projector", "projector"), ("automation", "automation engine"), ("bridge", "device bridge")]


def q(expr, legend):
    return {"expr": expr, "legend": legend}


def quantiles(metric, by, legend, qs=(0.5, 0.99)):
    return [q(f'histogram_quantile({x}, sum by (le{", " + by if by else ""}) (rate({metric}[{RI}])))',
              f"p{int(x * 100)} {legend}") for x in qs]


# (row title, [(panel title, unit, kind, description, [queries])])
ROWS = [
    ("Services: golden signals", [
        ("Services up", "none", "stat",
         "1 when Prometheus scraped the service's /metrics at its last try, per instance. 0 pages after a minute (HomeLinkServiceDown).",
         [q('up{job="homelink"}', "{{instance}}")]),
        ("HTTP requests per second", "reqps", "timeseries",
         "Requests answered per second by route, for the command API and the query API (GraphQL, including subscription upgrades). Traffic.",
         [q(f"sum by (route) (rate(homelink_{s}_http_requests_total[{RI}]))", f"{n} {{{{route}}}}") for s, n in HTTP]),
        ("HTTP 5xx share", "percentunit", "timeseries",
         "Share of requests answered with a 5xx status (a 503 while Kafka or Postgres is away, a bug). Errors.",
         [q(f'sum(rate(homelink_{s}_http_requests_total{{code=~"5.."}}[{RI}])) / sum(rate(homelink_{s}_http_requests_total[{RI}]))', n)
          for s, n in HTTP]),
        ("HTTP 4xx per second", "reqps", "timeseries",
         "Requests refused per second by status: 401/403 (tokens, roles), 400/422 (bad input), 409, 429 (rate limits). A jump is a broken app release or an attack.",
         [q(f'sum by (code) (rate(homelink_{s}_http_requests_total{{code=~"4.."}}[{RI}]))', f"{n} {{{{code}}}}") for s, n in HTTP]),
        ("HTTP latency p99 by route", "s", "timeseries",
         "99th percentile time to the response head by route. Latency.",
         [q(f"histogram_quantile(0.99, sum by (le, route) (rate(homelink_{s}_http_request_seconds_bucket[{RI}])))", f"{n} {{{{route}}}}")
          for s, n in HTTP]),
        ("HTTP requests in flight", "none", "timeseries",
         "Requests being answered right now. Saturation: it grows when a dependency slows down.",
         [q(f"sum(homelink_{s}_http_requests_in_flight)", n) for s, n in HTTP]),
        ("CPU per process", "percentunit", "timeseries",
         "CPU used by each HomeLink process (1 = one core). Saturation; on 2 cores the whole stack has 2.",
         [q(f'rate(process_cpu_seconds_total{{job="homelink"}}[{RI}])', "{{instance}}")]),
        ("Resident memory per process", "bytes", "timeseries",
         "Resident memory of each HomeLink process. Saturation; a steady climb is a leak.",
         [q('process_resident_memory_bytes{job="homelink"}', "{{instance}}")]),
        ("Errors by kind", "ops", "timeseries",
         "Errors and refused inputs per second, by service and kind (kafka_produce, rate_limited, dead_letter, mqtt_connection, ...). Errors.",
         [q(f"sum by (kind) (rate(homelink_{s}_errors_total[{RI}])) > 0", f"{n} {{{{kind}}}}") for s, n in SERVICES]),
    ]),
    ("Ingest", [
        ("Device messages in", "ops", "timeseries",
         "MQTT messages the bridge took from devices per second, by channel: state reports, command acks, status (online/offline).",
         [q(f'sum by (kind) (rate(homelink_bridge_messages_in_total{{kind=~"state|ack|status"}}[{RI}]))', "{{kind}}")]),
        ("Appended to the log", "ops", "timeseries",
         "Device facts the bridge appended to the telemetry topic per second, and events the projector applied to the read models per second.",
         [q(f'sum(rate(homelink_bridge_messages_out_total{{kind="telemetry"}}[{RI}]))', "bridge → telemetry"),
          q(f'sum(rate(homelink_projector_messages_out_total{{kind="applied"}}[{RI}]))', "projector applied")]),
        ("Records per batch read", "none", "timeseries",
         "Median records per batch read from the log, per consumer: large batches mean the consumer is catching up.",
         [q(f"histogram_quantile(0.5, sum by (le) (rate(homelink_{s}_consumer_batch_records_bucket[{RI}])))", n) for s, n in CONSUMERS]),
        ("Report append latency", "s", "timeseries",
         "From a device message's receipt by the bridge to Kafka's acknowledgement of its append (the bridge acknowledges the device only then).",
         quantiles('homelink_bridge_processing_seconds_bucket{stage="report_appended"}', "", "report appended")),
    ]),
    ("Log and consumers", [
        ("Consumer lag (records)", "none", "timeseries",
         "Records between each consumer's position and the end of each partition. Per topic and partition.",
         [q(f"max by (topic, partition) (homelink_{s}_consumer_lag_records)", f"{n} {{{{topic}}}}/{{{{partition}}}}") for s, n in CONSUMERS]),
        ("Consumer lag (seconds)", "s", "timeseries",
         "Age of the last record handled while records are behind (0 when caught up), per topic and partition. Over 10 s for a minute pages.",
         [q(f"max by (topic, partition) (homelink_{s}_consumer_lag_seconds)", f"{n} {{{{topic}}}}/{{{{partition}}}}") for s, n in CONSUMERS]),
        ("Batch apply time", "s", "timeseries",
         "Time to apply one batch read from the log (one Postgres transaction with its positions): projector and automation engine.",
         quantiles('homelink_projector_processing_seconds_bucket{stage="apply_batch"}', "", "projector")
         + quantiles('homelink_automation_processing_seconds_bucket{stage="apply_batch"}', "", "automation")),
    ]),
    ("Latency: the two SLOs", [
        ("Tap → device", "s", "timeseries",
         "From a command's recording in the log to its publish to the device's broker, first deliveries (device bridge). SLO: under 1 s for 99.9 %.",
         quantiles('homelink_bridge_processing_seconds_bucket{stage="tap_to_device"}', "", "tap → device", (0.5, 0.95, 0.99))),
        ("Report → app", "s", "timeseries",
         "From the bridge's receipt of a device report to its fan-out on the app's subscriptions (query API). SLO: under 1 s for 99.9 %.",
         quantiles('homelink_query_api_processing_seconds_bucket{stage="report_to_fanout"}', "", "report → app", (0.5, 0.95, 0.99))),
        ("SLO: share over 1 s (1 h)", "percentunit", "stat",
         "Share of commands and reports slower than 1 s over the last hour (recording rules); the budget is 0.1 %.",
         [q("homelink:tap_to_device_slow:ratio_rate1h", "tap → device"), q("homelink:report_to_app_slow:ratio_rate1h", "report → app")]),
        ("Where a command's time goes (p99)", "s", "timeseries",
         "p99 of each step of a command: accepted by the command API (checks, lock, append), published by the bridge.",
         [q(f'histogram_quantile(0.99, sum by (le) (rate(homelink_command_api_processing_seconds_bucket{{stage="command_accepted"}}[{RI}])))', "command accepted"),
          q(f'histogram_quantile(0.99, sum by (le) (rate(homelink_bridge_processing_seconds_bucket{{stage="command_publish"}}[{RI}])))', "command publish")]),
    ]),
    ("Devices and brokers", [
        ("Connected clients per broker", "none", "timeseries",
         "Clients each Mosquitto broker says are connected ($SYS/broker/clients/connected, every 10 s): devices plus the bridges' own connections. A fall of 20 % in 5 minutes pages.",
         [q("max by (broker) (homelink_bridge_broker_clients_connected)", "{{broker}}")]),
        ("MQTT connection errors", "ops", "timeseries",
         "The bridge's broker connections failing and reconnecting, per second.",
         [q(f'sum(rate(homelink_bridge_errors_total{{kind="mqtt_connection"}}[{RI}]))', "bridge ↔ broker")]),
        ("Dead letters", "none", "timeseries",
         "Device messages refused to the dead-letter topic, and events the projector could not apply, per interval. Any pages or files a ticket.",
         [q(f'sum(increase(homelink_bridge_messages_out_total{{kind="dead_letter"}}[{RI}]))', "device messages"),
          q(f'sum(increase(homelink_projector_errors_total{{kind="dead_letter"}}[{RI}]))', "projector events")]),
        ("Rate-limited", "ops", "timeseries",
         "Refused for going too fast, per second: app requests (command API), sign-ins, and device messages over a device's rate.",
         [q(f'sum(rate(homelink_command_api_errors_total{{kind="rate_limited"}}[{RI}]))', "app requests"),
          q(f'sum(rate(homelink_command_api_errors_total{{kind="sign_in_throttled"}}[{RI}]))', "sign-ins"),
          q(f'sum(rate(homelink_bridge_errors_total{{kind="device_rate_limited"}}[{RI}]))', "device messages")]),
    ]),
    ("Commands", [
        ("Command flow", "ops", "timeseries",
         "Commands per second: accepted by the command API, published to devices, resent (unanswered scene/automation parts), sent again after a contrary report, revoked, expired undelivered.",
         [q(f'sum(rate(homelink_command_api_messages_out_total{{kind="command"}}[{RI}]))', "accepted"),
          q(f'sum(rate(homelink_bridge_messages_out_total{{kind="cmd"}}[{RI}]))', "published"),
          q(f'sum(rate(homelink_bridge_messages_out_total{{kind="command_resent"}}[{RI}]))', "resent"),
          q(f'sum(rate(homelink_bridge_messages_out_total{{kind="command_retried"}}[{RI}]))', "sent again"),
          q(f'sum(rate(homelink_bridge_messages_out_total{{kind="command_revoked"}}[{RI}]))', "revoked"),
          q(f'sum(rate(homelink_bridge_messages_out_total{{kind="command_expired"}}[{RI}]))', "expired")]),
        ("Commands expiring undelivered", "percentunit", "timeseries",
         "Share of commands read by the bridge that expired before reaching their device. Over 5 % (and 6 a minute) for 5 minutes pages.",
         [q(f'sum(rate(homelink_bridge_messages_out_total{{kind="command_expired"}}[{RI}])) / sum(rate(homelink_bridge_messages_in_total{{kind="command_log"}}[{RI}]))', "expired share")]),
        ("Kafka append errors", "ops", "timeseries",
         "Failed appends to the log per second, by service (retried; writes answer 503 while it lasts).",
         [q(f'sum(rate(homelink_{s}_errors_total{{kind="kafka_produce"}}[{RI}]))', n) for s, n in [("command_api", "command API"), ("bridge", "device bridge"), ("automation", "automation engine")]]),
    ]),
    ("Automations", [
        ("Triggers by outcome", "ops", "timeseries",
         "Automation triggers per second by outcome: run, queued, skipped (mode), conditions (did not hold), stopped (loop guard or breaker), paused.",
         [q(f'sum by (kind) (rate(homelink_automation_messages_in_total{{kind=~"trigger_.*"}}[{RI}]))', "{{kind}}")]),
        ("Timers", "ops", "timeseries",
         "Durable timers (for-durations, delays, waits, schedules) fired per second, and how late they fired (p99; a restart shows as a spike).",
         [q(f'sum(rate(homelink_automation_messages_in_total{{kind="timer_fired"}}[{RI}]))', "fired/s"),
          q(f'histogram_quantile(0.99, sum by (le) (rate(homelink_automation_processing_seconds_bucket{{stage="timer_lateness"}}[{RI}])))', "lateness p99 (s)")]),
        ("Fact → decision", "s", "timeseries",
         "From a fact's recording (a device report, presence) to the engine's decision on it, and the append of its commands.",
         quantiles('homelink_automation_processing_seconds_bucket{stage="fact_to_decision"}', "", "fact → decision")
         + quantiles('homelink_automation_processing_seconds_bucket{stage="append_effects"}', "", "append effects")),
        ("Automations paused by the breaker", "none", "timeseries",
         "Automations paused for firing too often (loop breaker), per interval; the owner sees the reason in the automation's runs.",
         [q(f'sum(increase(homelink_automation_errors_total{{kind="automation_paused"}}[{RI}]))', "paused")]),
    ]),
]


def dashboard():
    panels, pid, y = [], 1, 0
    for title, row in ROWS:
        panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        for i, (ptitle, unit, kind, desc, queries) in enumerate(row):
            w = 8
            panel = {
                "type": kind, "title": ptitle, "id": pid, "description": desc,
                "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"},
                "gridPos": {"h": 8, "w": w, "x": (i % 3) * w, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else
                           {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value"},
                "targets": [{"refId": chr(ord("A") + j), "expr": t["expr"], "legendFormat": t["legend"],
                             "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}} for j, t in enumerate(queries)],
            }
            panels.append(panel)
            pid += 1
        y += ((len(row) + 2) // 3) * 8
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "description": "The Prometheus that scrapes HomeLink's services (job \"homelink\")",
                      "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
                       {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}],
        "title": "HomeLink / Overview",
        "uid": "homelink-overview",
        "description": "Golden signals of every HomeLink service, ingest, consumer lag, the two SLOs, devices and brokers, commands and automations. Generated by infra/grafana/generate.py.",
        "tags": ["homelink"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels,
    }


def readme():
    out = ["# HomeLink's Grafana dashboard", "",
           "`homelink-overview.json` is a Grafana dashboard (import it: *Dashboards → New → Import*, pick the",
           "Prometheus that scrapes HomeLink's services under the job name `homelink`). It is generated by",
           "`generate.py` together with this page; edit the script, run it, commit both. The test suite",
           "(`e2e/tests/operations.rs`) runs every query below against a live test stack's Prometheus and fails",
           "when one errors or names a metric no service exports, and fails when these files are out of date.",
           "",
           "The alerts these panels explain are in `infra/prometheus/homelink-rules.yml`; what to do about",
           "each is in [`docs/runbook.md`](../../docs/runbook.md).", ""]
    for title, row in ROWS:
        out += [f"## {title}", ""]
        for ptitle, unit, kind, desc, queries in row:
            out.append(f"- **{ptitle}** ({kind}, {unit}): {desc}")
            for t in queries:
                out.append(f"  - `{t['expr']}` — {t['legend']}")
        out.append("")
    return "\n".join(out)


def main():
    files = {HERE / "homelink-overview.json": json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n",
             HERE / "README.md": readme()}
    if "--check" in sys.argv:
        stale = [p.name for p, text in files.items() if not p.exists() or p.read_text() != text]
        if stale:
            sys.exit(f"out of date, run python3 infra/grafana/generate.py: {', '.join(stale)}")
        return
    for p, text in files.items():
        p.write_text(text)


if __name__ == "__main__":
    main()
