//! Prometheus metrics shared by every service: names follow
//! `homelink_<component>_<name>_<unit>`, counters end in `_total`.
//!
//! Each service owns a [`Registry`] (not the global one) so that several
//! services can run in one test process.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

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
    /// HTTP requests answered, by matched `route`, `method` and status `code`.
    pub http_requests: IntCounterVec,
    /// HTTP request latency (to the response head), by matched `route`.
    pub http_latency: HistogramVec,
    /// HTTP requests being answered now (saturation).
    pub http_in_flight: IntGauge,
}

/// Latency buckets in seconds, shared by every latency histogram so that
/// SLO thresholds (1 s) and dashboard quantiles line up across services.
pub const LATENCY_BUCKETS: [f64; 13] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

impl ServiceMetrics {
    pub fn new(component: &str) -> Self {
        let registry = Registry::new();
        let name = |n: &str| format!("homelink_{component}_{n}");
        let messages_in = IntCounterVec::new(Opts::new(name("messages_in_total"), "Messages received"), &["kind"]).expect("valid metric");
        let messages_out = IntCounterVec::new(Opts::new(name("messages_out_total"), "Messages sent"), &["kind"]).expect("valid metric");
        let errors = IntCounterVec::new(Opts::new(name("errors_total"), "Errors and refused inputs"), &["kind"]).expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(name("processing_seconds"), "Processing latency").buckets(LATENCY_BUCKETS.to_vec()),
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
        let http_requests =
            IntCounterVec::new(Opts::new(name("http_requests_total"), "HTTP requests answered"), &["route", "method", "code"])
                .expect("valid metric");
        let http_latency = HistogramVec::new(
            HistogramOpts::new(name("http_request_seconds"), "HTTP request latency to the response head").buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let http_in_flight = IntGauge::new(name("http_requests_in_flight"), "HTTP requests being answered").expect("valid metric");
        registry.register(Box::new(http_requests.clone())).expect("unique metric");
        registry.register(Box::new(http_latency.clone())).expect("unique metric");
        registry.register(Box::new(http_in_flight.clone())).expect("unique metric");
        // CPU seconds, resident memory, open files of this process (Linux):
        // the saturation panels. Several services in one test process each
        // export the same figures, which is harmless.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())).expect("unique metric");
        Self {
            registry,
            messages_in,
            messages_out,
            errors,
            latency,
            consumer_lag,
            consumer_lag_seconds,
            consumer_batch_records,
            http_requests,
            http_latency,
            http_in_flight,
        }
    }

    /// Creates the series a service's dashboards and alerts read, at zero,
    /// before anything happened: a counter that first appears at 1 has no
    /// `rate()` or `increase()` for its first event, so an alert on "any
    /// dead letter" would miss the first one, and a panel would say "no
    /// data" instead of 0.
    pub fn touch(&self, messages_in: &[&str], messages_out: &[&str], errors: &[&str], stages: &[&str]) {
        for k in messages_in {
            self.messages_in.with_label_values(&[k]);
        }
        for k in messages_out {
            self.messages_out.with_label_values(&[k]);
        }
        for k in errors {
            self.errors.with_label_values(&[k]);
        }
        for k in stages {
            self.latency.with_label_values(&[k]);
        }
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
