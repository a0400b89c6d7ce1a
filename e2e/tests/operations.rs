//! What operators get (issue 18): the alert rules pass `promtool check
//! rules` and their unit tests, every alert links a runbook section that
//! exists, the Grafana dashboard is what its generator writes, and every
//! query of the dashboard and of the rules runs against a real Prometheus
//! scraping a live test stack and names only metrics the services export.

mod common;

use common::raw::RawDevice;
use common::{eventually, free_port, Stack};
use homelink_events::DeviceKind;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

fn rules() -> PathBuf {
    root().join("infra/prometheus/homelink-rules.yml")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?} could not start (infra/dev installs it): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let checked = run(Command::new("promtool").arg("check").arg("rules").arg(rules()));
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run(Command::new("promtool").arg("test").arg("rules").arg(root().join("infra/prometheus/tests/homelink-rules.test.yml")));
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// GitHub's anchor of a Markdown heading: lower case, spaces to dashes,
/// punctuation other than `-` and `_` dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_links_a_runbook_section_that_exists() {
    let rules = std::fs::read_to_string(rules()).expect("rules");
    let runbook = std::fs::read_to_string(root().join("docs/runbook.md")).expect("runbook");
    let sections: BTreeSet<String> = runbook.lines().filter_map(|l| l.strip_prefix("## ")).map(anchor).collect();
    let alerts = rules.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    let links: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("runbook_url: docs/runbook.md#")).collect();
    assert!(alerts >= 12, "the rules hold the alerts the issue asks for, found {alerts}");
    assert_eq!(links.len(), alerts, "every alert has a runbook_url into docs/runbook.md");
    for l in links {
        assert!(sections.contains(l), "docs/runbook.md has no section #{l} (sections: {sections:?})");
    }
}

#[test]
fn the_dashboard_is_what_its_generator_writes() {
    run(Command::new("python3").arg(root().join("infra/grafana/generate.py")).arg("--check"));
}

/// The metric names a PromQL expression reads (not functions, keywords,
/// label names, strings, durations or numbers).
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 25] = [
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
        // Aggregations, which may be followed by `by (…)` before their parenthesis.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const GROUPING: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    let s: Vec<char> = expr.chars().collect();
    let (mut names, mut i) = (BTreeSet::new(), 0);
    // Skips from an opening bracket to its match (strings inside included).
    let skip_group = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        while i < s.len() {
            match s[i] {
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                '"' | '\'' => {
                    let q = s[i];
                    i += 1;
                    while i < s.len() && s[i] != q {
                        i += if s[i] == '\\' { 2 } else { 1 };
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    while i < s.len() {
        let c = s[i];
        if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '"' || c == '\'' {
            i += 1;
            while i < s.len() && s[i] != c {
                i += if s[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c.is_ascii_digit() || (c == '.' && s.get(i + 1).is_some_and(char::is_ascii_digit)) {
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_' || s[i] == ':') {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let mut j = i;
            while j < s.len() && s[j].is_whitespace() {
                j += 1;
            }
            let call = s.get(j) == Some(&'(');
            if GROUPING.contains(&word.as_str()) && call {
                i = skip_group(j, '(', ')');
            } else if !call && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn the_metric_name_reader_knows_promql() {
    let e = r#"histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{stage="x",le="1"}[5m]))) / on (job) group_left (instance) b offset 5m > 1e3 and bool c:d:e"#;
    assert_eq!(metric_names(e), ["a_bucket", "b", "c:d:e"].into_iter().map(String::from).collect());
    assert_eq!(metric_names(r#"sum(rate(x{code=~"5.."}[1m])) by (route)"#), ["x".to_owned()].into());
}

/// A Prometheus server of its own, stopped when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(targets: &[u16]) -> Self {
        let dir = std::env::temp_dir().join(format!("homelink-prometheus-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a folder for prometheus");
        let port = free_port();
        let targets: Vec<String> = targets.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        let config = format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: ['{}']\nscrape_configs:\n  - job_name: homelink\n    static_configs:\n      - targets: [{}]\n",
            rules().display(),
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("config");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (the Debian package infra/dev installs)");
        Self { child, port, dir }
    }

    async fn get(&self, http: &reqwest::Client, path: &str, query: &[(&str, &str)]) -> Value {
        let r = http.get(format!("http://127.0.0.1:{}{path}", self.port)).query(query).send().await.expect("prometheus answers");
        r.json().await.expect("json")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_dashboard_and_rule_query_runs_against_the_stack_and_names_only_exported_metrics() {
    let stack = Stack::start().await;
    let automation = stack.start_automation().await;
    let ports = [stack.command_port, stack.query_port, stack.bridge_port, stack.projector_port, automation];
    let prometheus = Prometheus::start(&ports);

    // Traffic through every path the panels show: a device online, a
    // report, a command to it, a GraphQL read.
    let home = stack.seed(&[(DeviceKind::Light, "Lamp", "Hall")]).await;
    let owner = home.accounts[0].access_token.clone();
    let mut lamp = RawDevice::connect(&stack, home.spec(0, None), Duration::from_secs(10)).await;
    lamp.send("state", json!({"v": 1, "seq": 1, "state": {"on": true, "brightness": 40}})).await;
    common::reported(&stack, home.devices[0].id, "brightness", json!(40)).await;
    let r = stack.command(&home, home.devices[0].id).json(&json!({"set": {"brightness": 10}})).send().await.expect("command");
    assert_eq!(r.status(), 202);
    let got = lamp.commands_within(Duration::from_secs(10)).await;
    assert!(!got.is_empty(), "the lamp received its command");
    let read = stack.gql(&owner, "query($h: ID!) { household(id: $h) { name } }", json!({"h": home.household_id})).await;
    assert_eq!(read["data"]["household"]["name"], "Test home", "{read}");

    // Every service scraped, and the rules evaluated, at least twice.
    let http = stack.http.clone();
    eventually(Duration::from_secs(60), "every service scraped and up", || async {
        let t = prometheus.get(&http, "/api/v1/targets", &[]).await;
        let active = t["data"]["activeTargets"].as_array()?.clone();
        (active.len() == ports.len() && active.iter().all(|a| a["health"] == "up")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rules_state = prometheus.get(&http, "/api/v1/rules", &[]).await;
    let mut recorded = BTreeSet::new();
    let mut rule_exprs = Vec::new();
    for g in rules_state["data"]["groups"].as_array().expect("rule groups") {
        for r in g["rules"].as_array().expect("rules") {
            assert_eq!(r["health"], "ok", "a rule fails to evaluate: {r}");
            if r["type"] == "recording" {
                recorded.insert(r["name"].as_str().expect("name").to_owned());
            }
            rule_exprs.push((r["name"].as_str().expect("name").to_owned(), r["query"].as_str().expect("query").to_owned()));
        }
    }
    assert!(rule_exprs.len() >= 20, "Prometheus loaded the rule file: {rules_state}");

    let names = prometheus.get(&http, "/api/v1/label/__name__/values", &[]).await;
    let exported: BTreeSet<String> =
        names["data"].as_array().expect("names").iter().filter_map(|n| n.as_str().map(str::to_owned)).chain(recorded.clone()).collect();

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("infra/grafana/homelink-overview.json")).expect("dashboard"))
            .expect("json");
    let mut queries: Vec<(String, String)> = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            queries.push((p["title"].as_str().unwrap_or("?").to_owned(), t["expr"].as_str().expect("expr").to_owned()));
        }
    }
    assert!(queries.len() >= 40, "the dashboard has its panels");
    queries.extend(rule_exprs);

    let mut faults = Vec::new();
    for (what, expr) in &queries {
        let expr = expr.replace("$__rate_interval", "1m");
        let answer = prometheus.get(&http, "/api/v1/query", &[("query", &expr)]).await;
        if answer["status"] != "success" {
            faults.push(format!("{what}: `{expr}` failed: {}", answer["error"]));
        }
        for name in metric_names(&expr) {
            if !exported.contains(&name) {
                faults.push(format!("{what}: `{expr}` reads {name}, which no service exports"));
            }
        }
    }
    assert!(faults.is_empty(), "{} faults:\n{}", faults.len(), faults.join("\n"));

    // The figures the panels show are the stack's own: the command above was
    // timed from tap to device, the lamp's report reached the fan-out.
    let taps = prometheus
        .get(&http, "/api/v1/query", &[("query", r#"sum(homelink_bridge_processing_seconds_count{stage="tap_to_device"})"#)])
        .await;
    let n: f64 = taps["data"]["result"][0]["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    assert!(n >= 1.0, "the tap → device histogram counted the command: {taps}");
    let up = prometheus.get(&http, "/api/v1/query", &[("query", r#"sum(up{job="homelink"})"#)]).await;
    assert_eq!(up["data"]["result"][0]["value"][1], "5", "{up}");
}
