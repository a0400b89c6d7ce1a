//! Prometheus metrics shared by every service: names follow
//! `homelink_<component>_<name>_<unit>`, counters end in `_total`.
//!
//! Each service owns a [`Registry`] (not the global one) so that several
//! services can run in one test process.

use prometheus::{Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// The metrics every service has.
#[derive(Clone)]
pub struct ServiceMetrics {
    pub registry: Registry,
    /// Messages taken in, by `kind` (for example `state`, `http_command`).
    pub messages_in: IntCounterVec,
    /// Messages sent on, by `kind`.
    pub messages_out: IntCounterVec,
    /// Errors and refusals, by `kind`.
    pub errors: IntCounterVec,
    /// Processing latency by `stage`.
    pub latency: HistogramVec,
    /// Consumer lag in records, by `topic` and `partition`.
    pub consumer_lag: IntGaugeVec,
    /// Consumer lag in seconds (age of the last record handled while records
    /// are behind; 0 when none is), by `topic` and `partition`.
    pub consumer_lag_seconds: GaugeVec,
    /// Records per batch read from the log.
    pub consumer_batch_records: Histogram,
}

impl ServiceMetrics {
    pub fn new(component: &str) -> Self {
        let registry = Registry::new();
        let name = |n: &str| format!("homelink_{component}_{n}");
        let messages_in = IntCounterVec::new(Opts::new(name("messages_in_total"), "Messages received"), &["kind"]).expect("valid metric");
        let messages_out = IntCounterVec::new(Opts::new(name("messages_out_total"), "Messages sent"), &["kind"]).expect("valid metric");
        let errors = IntCounterVec::new(Opts::new(name("errors_total"), "Errors and refused inputs"), &["kind"]).expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(name("processing_seconds"), "Processing latency")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["stage"],
        )
        .expect("valid metric");
        let consumer_lag = IntGaugeVec::new(Opts::new(name("consumer_lag_records"), "Records behind the log end"), &["topic", "partition"])
            .expect("valid metric");
        let consumer_lag_seconds = GaugeVec::new(
            Opts::new(name("consumer_lag_seconds"), "Age of the last record handled while records are behind"),
            &["topic", "partition"],
        )
        .expect("valid metric");
        let consumer_batch_records = Histogram::with_opts(
            HistogramOpts::new(name("consumer_batch_records"), "Records per batch read from the log")
                .buckets(vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0]),
        )
        .expect("valid metric");
        registry.register(Box::new(consumer_lag_seconds.clone())).expect("unique metric");
        registry.register(Box::new(consumer_batch_records.clone())).expect("unique metric");
        for c in [&messages_in, &messages_out, &errors] {
            registry.register(Box::new(c.clone())).expect("unique metric");
        }
        registry.register(Box::new(latency.clone())).expect("unique metric");
        registry.register(Box::new(consumer_lag.clone())).expect("unique metric");
        Self { registry, messages_in, messages_out, errors, latency, consumer_lag, consumer_lag_seconds, consumer_batch_records }
    }

    /// The Prometheus text exposition of this registry.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Reads one counter (tests and benchmarks).
    pub fn count(counter: &IntCounterVec, label: &str) -> u64 {
        counter.with_label_values(&[label]).get()
    }
}
