//! The server's limits and batching settings, declared once: they are `search-r3 serve`'s
//! flags (the CLI flattens [`Limits`]), part of [`ServeOptions`](crate::ServeOptions), and
//! what `/info` reports (flattened into its body). The defaults are text-embeddings-inference's
//! where it has one.

use clap::builder::TypedValueParser;
use clap::{Args, FromArgMatches};
use serde::Serialize;
use std::time::Duration;
use utoipa::ToSchema;

/// Server limits and batching, with text-embeddings-inference's defaults.
#[derive(Args, Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Limits {
    /// Requests queued for the model before new ones get 429.
    #[arg(long, default_value_t = 512)]
    pub max_concurrent_requests: usize,
    /// Prompt tokens per model batch (one forward pass).
    #[arg(long, default_value_t = 16384)]
    pub max_batch_tokens: usize,
    // On CPU small passes are faster per token (cache-resident activations; 1–2k measured
    // best for SmolLM2, see docs/benchmarks.md).
    /// Padded tokens per forward pass; a batch runs as length-sorted passes of this size
    /// (small passes are faster per token on CPU).
    #[arg(long, default_value_t = 2048)]
    pub max_forward_tokens: usize,
    /// Requests per model batch.
    #[arg(long, default_value_t = 64)]
    pub max_batch_requests: usize,
    /// Inputs (or documents) per request; more get 413.
    #[arg(long, default_value_t = 32)]
    pub max_client_batch_size: usize,
    /// Tokens per input; longer ones get 413 unless truncated (default: the index's document
    /// limit, or 512).
    // `/info` reports the limit in force, never null.
    #[arg(long)]
    #[schema(value_type = usize, required = true)]
    pub max_input_length: Option<usize>,
    /// Request body limit in bytes; larger bodies get 413.
    #[arg(long, default_value_t = 2_000_000)]
    pub payload_limit: usize,
    /// Bytes per input text: a longer text is cut to this many bytes when truncating, else
    /// refused (413) — before it is tokenized (default: 32 × max_input_length; no 512-token
    /// text of ordinary words comes near it).
    #[arg(long)]
    #[schema(value_type = usize, required = true)]
    pub max_input_bytes: Option<usize>,
    /// Connections served at once; more wait in the listen backlog until one closes.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers; slower ones are disconnected.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout: u64,
    /// Seconds a client has to send a request's body once its headers are in (408 after).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout: u64,
    /// Seconds one request may take in all, queue and model included (503 after; its model
    /// work is cancelled).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout: u64,
    /// Most hits one search returns.
    #[arg(skip = 1000usize)]
    pub max_k: usize,
    /// Cut over-long inputs instead of answering 413 (a request's `truncate` overrides).
    #[arg(long)]
    pub auto_truncate: bool,
    /// Whether queued requests share forward passes (TEI's dynamic batching).
    // Its own id: `bench serve` flattens these limits next to its `--batching on|off|both`.
    #[arg(
        id = "no_batching",
        long = "no-batching",
        action = clap::ArgAction::SetFalse,
        help = "One request per forward pass instead of batching queued requests together"
    )]
    pub batching: bool,
    /// Model worker threads (each runs whole batches; the matmuls use every core already).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Seconds shutdown waits for in-flight requests before dropping them (the queue is
    /// drained and the index flushed either way).
    #[arg(long, default_value = "60", value_parser = clap::value_parser!(u64).map(Duration::from_secs))]
    #[serde(skip)]
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    /// The flags' defaults.
    fn default() -> Self {
        let matches = Limits::augment_args(clap::Command::new("limits"))
            .try_get_matches_from(["limits"])
            .expect("the defaults parse");
        Limits::from_arg_matches(&matches).expect("the defaults parse")
    }
}

impl Limits {
    /// The same settings as `search-r3 serve` flags.
    pub fn to_args(&self) -> Vec<String> {
        let mut v: Vec<String> = [
            ("--max-concurrent-requests", self.max_concurrent_requests),
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--max-forward-tokens", self.max_forward_tokens),
            ("--max-batch-requests", self.max_batch_requests),
            ("--max-client-batch-size", self.max_client_batch_size),
            ("--payload-limit", self.payload_limit),
            ("--max-connections", self.max_connections),
            ("--header-read-timeout", self.header_read_timeout as usize),
            ("--body-read-timeout", self.body_read_timeout as usize),
            ("--request-timeout", self.request_timeout as usize),
            ("--workers", self.workers),
            (
                "--shutdown-timeout",
                self.shutdown_timeout.as_secs() as usize,
            ),
        ]
        .iter()
        .flat_map(|(k, n)| [k.to_string(), n.to_string()])
        .collect();
        if let Some(n) = self.max_input_length {
            v.extend(["--max-input-length".to_string(), n.to_string()]);
        }
        if let Some(n) = self.max_input_bytes {
            v.extend(["--max-input-bytes".to_string(), n.to_string()]);
        }
        for (on, flag) in [
            (self.auto_truncate, "--auto-truncate"),
            (!self.batching, "--no-batching"),
        ] {
            if on {
                v.push(flag.to_string());
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[String]) -> Limits {
        let cmd = Limits::augment_args(clap::Command::new("limits"));
        let m = cmd
            .try_get_matches_from(std::iter::once("limits".to_string()).chain(args.iter().cloned()))
            .unwrap();
        Limits::from_arg_matches(&m).unwrap()
    }

    #[test]
    fn flags_round_trip() {
        let d = Limits::default();
        assert_eq!(d.max_concurrent_requests, 512);
        assert_eq!(d.max_input_length, None);
        assert!(d.batching && !d.auto_truncate);
        assert_eq!(d.shutdown_timeout, Duration::from_secs(60));
        assert_eq!(parse(&d.to_args()), d);
        assert_eq!(d.header_read_timeout, 10);
        let l = Limits {
            max_input_length: Some(16),
            max_input_bytes: Some(100),
            max_connections: 3,
            request_timeout: 7,
            auto_truncate: true,
            batching: false,
            workers: 3,
            shutdown_timeout: Duration::from_secs(5),
            ..d
        };
        assert_eq!(parse(&l.to_args()), l);
    }
}
