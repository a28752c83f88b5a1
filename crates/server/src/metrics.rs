//! Prometheus metrics: request counts and latencies per route, the queue, batch sizes and
//! token throughput (rate of the token counters).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Every metric the server exports, in its own registry.
pub(crate) struct Metrics {
    registry: Registry,
    /// Requests by route and status code.
    pub requests: IntCounterVec,
    /// End-to-end request latency by route.
    pub latency: HistogramVec,
    /// Jobs waiting for a model worker.
    pub queue_depth: IntGauge,
    /// Seconds a job waited in the queue.
    pub queue_time: Histogram,
    /// Seconds of model work per batch, by kind (`embed`, `reason`).
    pub inference_time: HistogramVec,
    /// Requests per model batch.
    pub batch_requests: Histogram,
    /// Prompt tokens per model batch.
    pub batch_tokens: Histogram,
    /// Tokens processed, by kind (`prompt`: embedded prompt tokens, `generated`: reasoning
    /// tokens written by the model).
    pub tokens: IntCounterVec,
    /// Live documents in the index.
    pub index_documents: IntGauge,
    /// Model batches stopped between forward passes because all their clients had gone.
    pub cancelled_batches: IntCounter,
}

fn exp_buckets(start: f64, factor: f64, n: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, n).expect("valid bucket parameters")
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "search_r3_requests_total",
                "HTTP requests by route and status",
            ),
            &["route", "status"],
        )
        .expect("metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "search_r3_request_duration_seconds",
                "End-to-end request latency by route",
            )
            .buckets(exp_buckets(0.001, 2.0, 18)),
            &["route"],
        )
        .expect("metric");
        let queue_depth = IntGauge::new("search_r3_queue_depth", "Jobs waiting for a model worker")
            .expect("metric");
        let queue_time = Histogram::with_opts(
            HistogramOpts::new(
                "search_r3_queue_duration_seconds",
                "Seconds a job waited for a model worker",
            )
            .buckets(exp_buckets(0.0005, 2.0, 18)),
        )
        .expect("metric");
        let inference_time = HistogramVec::new(
            HistogramOpts::new(
                "search_r3_inference_duration_seconds",
                "Seconds of model work per batch",
            )
            .buckets(exp_buckets(0.001, 2.0, 18)),
            &["kind"],
        )
        .expect("metric");
        let batch_requests = Histogram::with_opts(
            HistogramOpts::new("search_r3_batch_requests", "Requests per model batch")
                .buckets(exp_buckets(1.0, 2.0, 10)),
        )
        .expect("metric");
        let batch_tokens = Histogram::with_opts(
            HistogramOpts::new("search_r3_batch_tokens", "Prompt tokens per model batch")
                .buckets(exp_buckets(16.0, 2.0, 12)),
        )
        .expect("metric");
        let tokens = IntCounterVec::new(
            Opts::new("search_r3_tokens_total", "Tokens processed by the model"),
            &["kind"],
        )
        .expect("metric");
        let index_documents =
            IntGauge::new("search_r3_index_documents", "Live documents in the index")
                .expect("metric");
        let cancelled_batches = IntCounter::new(
            "search_r3_cancelled_batches_total",
            "Model batches stopped early because all their clients had gone",
        )
        .expect("metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(queue_depth.clone()),
            Box::new(queue_time.clone()),
            Box::new(inference_time.clone()),
            Box::new(batch_requests.clone()),
            Box::new(batch_tokens.clone()),
            Box::new(tokens.clone()),
            Box::new(index_documents.clone()),
            Box::new(cancelled_batches.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            requests,
            latency,
            queue_depth,
            queue_time,
            inference_time,
            batch_requests,
            batch_tokens,
            tokens,
            index_documents,
            cancelled_batches,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
