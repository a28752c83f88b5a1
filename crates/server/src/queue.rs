//! The model side of the server: dedicated worker threads fed by one bounded queue.
//!
//! HTTP handlers tokenize, then hand a job to [`Queue`]; when the queue is full the job is
//! refused at once (429) instead of piling up in memory. A worker takes the oldest job and,
//! with batching on, every queued job of the same kind that still fits the batch limits
//! (prompt tokens, requests) — text-embeddings-inference's dynamic batching — so concurrent
//! requests share one forward pass. Reasoning jobs (generation) batch with each other.
//!
//! A job whose client has gone (disconnected, timed out) is skipped when it is taken; a batch
//! whose clients have *all* gone stops between two forward passes ([`Cancel`]), so a departed
//! client holds the worker for at most one pass.

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::Limits;
use search_r3_core::embedder::{EmbedError, Embedder, QueryEmbedding, Side};
use search_r3_index::l2_normalize;
use search_r3_model::Cancel;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Where a job's time went.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct JobTiming {
    /// Seconds waiting for a worker.
    pub queue_s: f64,
    /// Seconds of model work for the batch the job ran in.
    pub inference_s: f64,
    /// Requests in that batch.
    pub batch_requests: usize,
}

type Reply<T> = oneshot::Sender<Result<(T, JobTiming), String>>;

enum Task {
    Embed {
        side: Side,
        prompts: Vec<Vec<u32>>,
        out: Output,
    },
    Reason {
        query: String,
        reply: Reply<QueryEmbedding>,
    },
    Stop,
}

/// What an embedding job wants of its prompts' final hidden states.
enum Output {
    /// The state at the embed token (L2-normalised when `normalize`).
    Vector {
        normalize: bool,
        reply: Reply<Vec<Vec<f32>>>,
    },
    /// The state of every token (`/embed_all`).
    States { reply: Reply<Vec<Vec<Vec<f32>>>> },
}

struct Job {
    task: Task,
    enqueued: Instant,
    tokens: usize,
}

/// The bounded job queue and its worker threads.
pub(crate) struct Queue {
    tx: mpsc::Sender<Job>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    alive: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    n_workers: usize,
}

impl Queue {
    /// Starts `limits.workers` threads that run `embedder`, behind a queue of
    /// `limits.max_concurrent_requests` jobs.
    pub fn start(embedder: Arc<Embedder>, limits: &Limits, metrics: Arc<Metrics>) -> Queue {
        let limits = *limits;
        let (tx, rx) = mpsc::channel(limits.max_concurrent_requests.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let alive = Arc::new(AtomicUsize::new(0));
        let n = limits.workers.max(1);
        let workers = (0..n)
            .map(|i| {
                let (rx, emb, m, alive) =
                    (rx.clone(), embedder.clone(), metrics.clone(), alive.clone());
                alive.fetch_add(1, Ordering::SeqCst);
                std::thread::Builder::new()
                    .name(format!("model-worker-{i}"))
                    .spawn(move || {
                        worker(&rx, &emb, &limits, &m);
                        alive.fetch_sub(1, Ordering::SeqCst);
                    })
                    .expect("spawning a model worker")
            })
            .collect();
        Queue {
            tx,
            workers: Mutex::new(workers),
            alive,
            metrics,
            n_workers: n,
        }
    }

    /// Worker threads still running.
    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }

    fn submit(&self, task: Task, tokens: usize) -> Result<(), ApiError> {
        let job = Job {
            task,
            enqueued: Instant::now(),
            tokens,
        };
        // Counted before the send so a worker's decrement can never run first.
        self.metrics.queue_depth.inc();
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.dec();
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => ApiError::overloaded(),
                    mpsc::error::TrySendError::Closed(_) => {
                        ApiError::unhealthy("the model workers have stopped")
                    }
                })
            }
        }
    }

    async fn wait<T>(
        rx: oneshot::Receiver<Result<(T, JobTiming), String>>,
    ) -> Result<(T, JobTiming), ApiError> {
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(msg)) => Err(ApiError::backend(msg)),
            Err(_) => Err(ApiError::unhealthy(
                "the model worker stopped before answering",
            )),
        }
    }

    /// Embeds prompts that end with the embed token (L2-normalised when `normalize`).
    pub async fn embed(
        &self,
        side: Side,
        prompts: Vec<Vec<u32>>,
        normalize: bool,
    ) -> Result<(Vec<Vec<f32>>, JobTiming), ApiError> {
        let tokens = prompts.iter().map(Vec::len).sum();
        let (reply, rx) = oneshot::channel();
        let out = Output::Vector { normalize, reply };
        self.submit(Task::Embed { side, prompts, out }, tokens)?;
        Self::wait(rx).await
    }

    /// The final hidden state of every token of each prompt (unnormalised).
    pub async fn token_states(
        &self,
        side: Side,
        prompts: Vec<Vec<u32>>,
    ) -> Result<(Vec<Vec<Vec<f32>>>, JobTiming), ApiError> {
        let tokens = prompts.iter().map(Vec::len).sum();
        let (reply, rx) = oneshot::channel();
        let out = Output::States { reply };
        self.submit(Task::Embed { side, prompts, out }, tokens)?;
        Self::wait(rx).await
    }

    /// Lets the model reason about `query`, then embeds it at the embed token.
    pub async fn reason(&self, query: String) -> Result<(QueryEmbedding, JobTiming), ApiError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Task::Reason { query, reply }, 0)?;
        Self::wait(rx).await
    }

    /// Lets the workers finish every queued job, then stops and joins them. Call once no new
    /// jobs can arrive (the HTTP side has shut down).
    pub async fn shutdown(&self) {
        for _ in 0..self.n_workers {
            // Stop markers queue behind the real jobs, so those are answered first.
            self.metrics.queue_depth.inc();
            let stop = Job {
                task: Task::Stop,
                enqueued: Instant::now(),
                tokens: 0,
            };
            if self.tx.send(stop).await.is_err() {
                self.metrics.queue_depth.dec();
                break;
            }
        }
        let handles: Vec<_> = std::mem::take(&mut *self.workers.lock().expect("not poisoned"));
        let _ = tokio::task::spawn_blocking(move || {
            for h in handles {
                let _ = h.join();
            }
        })
        .await;
    }
}

fn same_kind(a: &Task, b: &Task) -> bool {
    match (a, b) {
        (
            Task::Embed {
                side: x, out: o, ..
            },
            Task::Embed {
                side: y, out: p, ..
            },
        ) => x == y && std::mem::discriminant(o) == std::mem::discriminant(p),
        (Task::Reason { .. }, Task::Reason { .. }) => true,
        _ => false,
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Job>>, emb: &Embedder, limits: &Limits, m: &Metrics) {
    // A job taken out of the channel that did not fit the batch; it still counts as queued.
    let mut carry: Option<Job> = None;
    loop {
        let first = match carry.take() {
            Some(j) => j,
            None => match rx.lock().expect("not poisoned").blocking_recv() {
                Some(j) => j,
                None => return,
            },
        };
        m.queue_depth.dec();
        if matches!(first.task, Task::Stop) {
            return;
        }
        let max_requests = match first.task {
            Task::Reason { .. } => limits.max_batch_requests.min(emb.reason_batch.max(1)),
            _ => limits.max_batch_requests,
        };
        let batch = if limits.batching {
            gather(
                first,
                rx,
                max_requests,
                limits.max_batch_tokens,
                m,
                &mut carry,
            )
        } else {
            vec![first]
        };
        run_batch(batch, emb, m);
    }
}

/// `first` and the queued jobs right behind it of the same kind, within `max_requests` and
/// `max_tokens`; the first job that does not fit goes to `carry`.
fn gather(
    first: Job,
    rx: &Mutex<mpsc::Receiver<Job>>,
    max_requests: usize,
    max_tokens: usize,
    m: &Metrics,
    carry: &mut Option<Job>,
) -> Vec<Job> {
    // Never wait for the lock here: another worker may hold it while it blocks for the next
    // job, and would hold it until one arrives — this batch would wait with it. A worker
    // holding the lock found the queue empty, so there is nothing to batch anyway.
    let mut rx = match rx.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return vec![first],
    };
    let mut tokens = first.tokens;
    let mut batch = vec![first];
    while batch.len() < max_requests {
        let Ok(j) = rx.try_recv() else { break };
        if !same_kind(&batch[0].task, &j.task) || tokens + j.tokens > max_tokens {
            *carry = Some(j);
            break;
        }
        m.queue_depth.dec();
        tokens += j.tokens;
        batch.push(j);
    }
    batch
}

fn reply_closed(j: &Job) -> bool {
    match &j.task {
        Task::Embed {
            out: Output::Vector { reply, .. },
            ..
        } => reply.is_closed(),
        Task::Embed {
            out: Output::States { reply },
            ..
        } => reply.is_closed(),
        Task::Reason { reply, .. } => reply.is_closed(),
        Task::Stop => false,
    }
}

/// Runs one batch through the model, timed as `inference_time{kind}`. An error or a panic
/// (which must fail the batch's requests, not kill the worker) becomes `"{what} failed: …"`;
/// a cancelled batch is counted in `cancelled_batches`.
fn run_model<T>(
    m: &Metrics,
    kind: &str,
    what: &str,
    started: Instant,
    f: impl FnOnce() -> Result<T, EmbedError>,
) -> Result<T, String> {
    let out = std::panic::catch_unwind(AssertUnwindSafe(f));
    m.inference_time
        .with_label_values(&[kind])
        .observe(started.elapsed().as_secs_f64());
    match out {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(EmbedError::Model(search_r3_model::Error::Cancelled))) => {
            m.cancelled_batches.inc();
            Err(format!(
                "{what} cancelled: every client of the batch went away"
            ))
        }
        Ok(Err(e)) => Err(format!("{what} failed: {e}")),
        Err(_) => Err(format!("{what} failed: the model panicked")),
    }
}

/// One job's `n` rows, in order, from its batch's results, or the batch's error.
fn take_rows<T>(
    rows: &mut Result<std::vec::IntoIter<T>, String>,
    n: usize,
) -> Result<Vec<T>, String> {
    match rows {
        Ok(it) => Ok(it.by_ref().take(n).collect()),
        Err(msg) => Err(msg.clone()),
    }
}

fn run_batch(mut batch: Vec<Job>, emb: &Embedder, m: &Metrics) {
    // A client that went away (timeout, disconnect) no longer needs its job run.
    batch.retain(|j| !reply_closed(j));
    if batch.is_empty() {
        return;
    }
    let started = Instant::now();
    let n = batch.len();
    m.batch_requests.observe(n as f64);
    let queue_s: Vec<f64> = batch
        .iter()
        .map(|j| (started - j.enqueued).as_secs_f64())
        .collect();
    for q in &queue_s {
        m.queue_time.observe(*q);
    }
    // Asked between forward passes: nobody left to answer means no reason to go on.
    let gone = || batch.iter().all(reply_closed);
    let cancel = Cancel::when(&gone);
    let timing = |i: usize| JobTiming {
        queue_s: queue_s[i],
        inference_s: started.elapsed().as_secs_f64(),
        batch_requests: n,
    };
    if let Task::Embed { side, out, .. } = &batch[0].task {
        let (side, states) = (*side, matches!(out, Output::States { .. }));
        let all: Vec<Vec<u32>> = batch
            .iter()
            .flat_map(|j| match &j.task {
                Task::Embed { prompts, .. } => prompts.clone(),
                _ => unreachable!("batches hold one kind"),
            })
            .collect();
        let tokens: usize = all.iter().map(Vec::len).sum();
        m.batch_tokens.observe(tokens as f64);
        let count = || {
            m.tokens
                .with_label_values(&["prompt"])
                .inc_by(tokens as u64)
        };
        if states {
            let mut rows = run_model(m, "embed", "embedding", started, || {
                emb.token_states(side, &all, cancel)
            })
            .inspect(|_| count())
            .map(Vec::into_iter);
            for (i, j) in batch.into_iter().enumerate() {
                let Task::Embed {
                    prompts,
                    out: Output::States { reply },
                    ..
                } = j.task
                else {
                    unreachable!("batches hold one kind")
                };
                let answer = take_rows(&mut rows, prompts.len()).map(|v| (v, timing(i)));
                let _ = reply.send(answer);
            }
        } else {
            let mut rows = run_model(m, "embed", "embedding", started, || {
                emb.embed_prompts_raw(side, &all, cancel)
            })
            .inspect(|_| count())
            .map(Vec::into_iter);
            for (i, j) in batch.into_iter().enumerate() {
                let Task::Embed {
                    prompts,
                    out: Output::Vector { normalize, reply },
                    ..
                } = j.task
                else {
                    unreachable!("batches hold one kind")
                };
                let answer = take_rows(&mut rows, prompts.len()).map(|mine| {
                    let mine = if normalize {
                        mine.into_iter().map(l2_normalize).collect()
                    } else {
                        mine
                    };
                    (mine, timing(i))
                });
                let _ = reply.send(answer);
            }
        }
    } else {
        let queries: Vec<String> = batch
            .iter()
            .map(|j| match &j.task {
                Task::Reason { query, .. } => query.clone(),
                _ => unreachable!("batches hold one kind"),
            })
            .collect();
        let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
        let mut results = run_model(m, "reason", "reasoning", started, || {
            emb.reason_queries(&refs, cancel)
        })
        .map(|v| {
            let generated: usize = v.iter().map(|e| e.generated_tokens).sum();
            m.tokens
                .with_label_values(&["generated"])
                .inc_by(generated as u64);
            v.into_iter()
        });
        for (i, j) in batch.into_iter().enumerate() {
            let Task::Reason { reply, .. } = j.task else {
                unreachable!("batches hold one kind")
            };
            let answer = match &mut results {
                Ok(it) => it
                    .next()
                    .map(|e| (e, timing(i)))
                    .ok_or_else(|| "reasoning returned too few results".to_string()),
                Err(msg) => Err(msg.clone()),
            };
            let _ = reply.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use search_r3_core::load::{load_embedder, EmbedderOptions};

    fn job(tokens: usize) -> Job {
        let (reply, _) = oneshot::channel();
        Job {
            task: Task::Embed {
                side: Side::Document,
                prompts: vec![vec![1; tokens]],
                out: Output::Vector {
                    normalize: true,
                    reply,
                },
            },
            enqueued: Instant::now(),
            tokens,
        }
    }

    #[test]
    fn a_worker_never_waits_for_the_lock_another_holds_while_idle() {
        let (tx, rx) = mpsc::channel(8);
        let rx = Arc::new(Mutex::new(rx));
        // Another worker blocked for its next job holds the lock until one arrives.
        let held = rx.lock().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let rx2 = rx.clone();
        std::thread::spawn(move || {
            let mut carry = None;
            let batch = gather(job(4), &rx2, 8, 1024, &Metrics::new(), &mut carry);
            let _ = done_tx.send(batch.len());
        });
        let n = done_rx.recv_timeout(std::time::Duration::from_secs(10));
        drop(held);
        assert_eq!(n, Ok(1), "the batch waited for the lock");
        // With the lock free, queued jobs of the same kind join within the limits.
        for t in [4, 4, 2000] {
            tx.try_send(job(t)).map_err(|_| ()).unwrap();
        }
        let mut carry = None;
        let batch = gather(job(4), &rx, 8, 1024, &Metrics::new(), &mut carry);
        assert_eq!(batch.len(), 3);
        assert_eq!(carry.map(|j| j.tokens), Some(2000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_queue_answers_503() {
        // The real SmolLM2, as in tests/http.rs: fetched by CI, skipped locally when absent.
        if search_r3_model::fetch::cached_path("smollm2").is_none()
            && std::env::var_os("CI").is_none()
        {
            eprintln!("SKIP: smollm2 not fetched");
            return;
        }
        let (e, _) =
            load_embedder("smollm2", &EmbedderOptions::default()).expect("loading smollm2");
        let e = Arc::new(e);
        let prompt = e.document_prompt("hello").unwrap().ids;
        let q = Queue::start(
            e,
            &Limits {
                batching: true,
                max_batch_tokens: 1024,
                max_batch_requests: 8,
                max_concurrent_requests: 4,
                workers: 2,
                ..Limits::default()
            },
            Arc::new(Metrics::new()),
        );
        assert_eq!(q.alive(), 2);
        let (v, t) = q
            .embed(Side::Document, vec![prompt.clone()], true)
            .await
            .unwrap();
        assert_eq!(v[0].len(), 576);
        assert_eq!(t.batch_requests, 1);
        q.shutdown().await;
        assert_eq!(q.alive(), 0);
        let err = q
            .embed(Side::Document, vec![prompt], true)
            .await
            .unwrap_err();
        assert_eq!(err.status.as_u16(), 503);
        assert_eq!(err.error_type, "unhealthy");
    }
}
