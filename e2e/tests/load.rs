//! The load generator as a correctness test: a short run against a whole
//! stack (real mTLS devices, Mosquitto, Kafka, Postgres, every service) loses
//! no acknowledged report, lets no probe change go missing on its
//! subscription, and writes a well-formed summary; a second run reuses the
//! cached fleet. No timing is asserted: figures are for BENCHMARKS.md.

mod common;

use common::Stack;
use homelink_tools::endpoints::{Demo, Endpoints, MqttListener};
use homelink_tools::load::{self, Options};
use std::time::Duration;
use uuid::Uuid;

fn endpoints(stack: &Stack) -> Endpoints {
    Endpoints {
        command_api: stack.api(),
        graphql: stack.graphql_url(),
        graphql_ws: stack.graphql_ws(),
        metrics: vec![format!("http://127.0.0.1:{}/metrics", stack.projector_port)],
        prometheus: None,
        mqtt_device: MqttListener {
            host: stack.env.mqtt_host.clone(),
            port: stack.env.device_port,
            ca_cert: stack.env.pki.ca_cert().display().to_string(),
        },
        kafka_bootstrap: stack.env.kafka.clone(),
        topic_prefix: String::new(),
        pki_dir: stack.env.pki.0.display().to_string(),
        demo: Demo { household_id: Uuid::nil(), devices_file: String::new(), accounts: Vec::new() },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_load_run_loses_nothing_and_reports_well_formed_figures() {
    let stack = Stack::start().await;
    let e = endpoints(&stack);
    let cache = std::env::temp_dir().join(format!("homelink-load-{}", Uuid::new_v4().simple())).join("fleet.json");
    let mut o = Options::new(10, 20, 300.0);
    o.ramp = Duration::from_secs(1);
    o.duration = Duration::from_secs(4);
    o.probes = 2;
    o.commands_per_sec = 2.0;
    o.idle = Duration::from_millis(500);
    o.settle = Duration::from_secs(30);
    o.fleet_cache = Some(cache.clone());

    let s = load::run(&e, &o).await.expect("load run");
    assert!(!s.fleet_reused);
    assert_eq!((s.households, s.devices, s.connected), (10, 200, 200));
    assert!(s.published > 1000, "published {}", s.published);
    assert_eq!(s.acked + s.refused, s.published, "every publish answered");
    assert_eq!(s.refused, 0);
    assert_eq!(s.verification.devices_checked, 200);
    assert_eq!(s.verification.devices_behind, 0, "lost reports: {:?}", s.verification);
    assert!(s.verification.errors.is_empty(), "{:?}", s.verification.errors);
    let r = &s.report_to_subscription;
    assert_eq!(r.probes, 2);
    assert!(r.reports > 0 && r.seen > 0, "{r:?}");
    assert_eq!(r.missing, 0, "a probe change never reached its subscriber: {r:?}");
    assert_eq!(r.seen + r.coalesced, r.reports);
    assert!(r.subscription_errors.is_empty(), "{r:?}");
    let c = &s.command_round_trip;
    assert!(c.sent > 0 && c.received == c.sent, "{c:?}");
    assert!(s.lossless());
    assert!(s.puback.as_ref().is_some_and(|p| p.p50_ms > 0.0 && p.p50_ms <= p.max_ms));
    let me = s.processes.iter().find(|p| p.name == "load-generator").expect("its own cost is measured");
    assert!(me.cpu_seconds > 0.0 && me.peak_rss_mb > 0.0, "{me:?}");

    // Machine-readable: the summary's JSON carries every figure by name.
    let v = serde_json::to_value(&s).expect("summary JSON");
    for key in ["offeredRate", "achievedRate", "puback", "reportToSubscription", "commandRoundTrip", "lag", "processes", "verification"] {
        assert!(v.get(key).is_some(), "summary lacks {key}: {v}");
    }

    // A rerun reuses the cached fleet and still loses nothing.
    let mut again = o.clone();
    again.commands_per_sec = 0.0;
    again.duration = Duration::from_secs(2);
    let s2 = load::run(&e, &again).await.expect("second load run");
    assert!(s2.fleet_reused);
    assert_eq!(s2.connected, 200);
    assert!(s2.lossless(), "{:?}", s2.verification);
    let _ = std::fs::remove_dir_all(cache.parent().expect("cache folder"));
}

/// A fleet larger than one process's share runs in several processes (the
/// rest in `homelink load-shard` children), spread over every broker; the
/// summary adds up all of them and the check covers every device.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_split_over_processes_and_brokers_loses_nothing() {
    let stack = Stack::start_on_all_brokers().await;
    let e = endpoints(&stack);
    let mut o = Options::new(8, 25, 300.0);
    o.ramp = Duration::from_secs(1);
    o.duration = Duration::from_secs(4);
    o.probes = 1;
    o.commands_per_sec = 0.0;
    o.idle = Duration::ZERO;
    o.settle = Duration::from_secs(30);
    o.devices_per_process = 100;
    o.shard_exe = Some(stack.env.bin_dir.join("homelink"));

    let s = load::run(&e, &o).await.expect("load run");
    assert_eq!(s.load_processes, 2, "100 devices here, 100 in one shard");
    assert_eq!((s.devices, s.connected), (200, 200));
    assert!(s.published > 1000, "published {}", s.published);
    assert_eq!(s.acked + s.refused, s.published, "every publish answered, the shard's included");
    assert_eq!(s.verification.devices_checked, 200);
    assert!(s.lossless(), "{:?}", s.verification);
    assert!(s.puback.is_some());
    stack.assert_shadow_cache_sound().await;
}
