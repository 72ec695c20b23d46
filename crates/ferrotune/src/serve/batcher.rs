//! Dynamic batching: requests wait in one queue; each inference worker (an OS thread, never
//! a thread of the async runtime) takes as many as fit in `max_batch_requests` and
//! `max_batch_tokens`, runs them as one batch through [`Predictor::predict_features`] and
//! hands each request its rows.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::metrics::Metrics;
use crate::data::batch::Features;
use crate::predict::Predictor;

/// What a worker answers: one row of logits per input, or why it could not.
pub type JobResult = Result<Vec<Vec<f32>>, String>;

/// One request's inputs, tokenized, waiting for a worker.
pub struct Job {
    /// The inputs' features, in request order.
    pub feats: Vec<Features>,
    /// Tokens over all inputs (before padding).
    pub tokens: usize,
    /// Where the answer goes; closed when the client has gone (timed out, disconnected).
    pub tx: oneshot::Sender<JobResult>,
}

/// How batches are formed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most tokens in a batch (a request alone over it still runs, alone).
    pub max_batch_tokens: usize,
    /// Most requests in a batch.
    pub max_batch_requests: usize,
    /// How long a worker holding fewer than the maximum waits for more (0: not at all).
    pub batch_wait: Duration,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Shutting down: run what is queued without waiting for batches to fill.
    draining: bool,
}

/// The queue of requests waiting for a worker.
pub struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl Queue {
    /// An empty, open queue.
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Queue {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            limits,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`; gives it back when the queue is closed.
    pub fn push(&self, job: Job) -> Result<(), Job> {
        let mut st = self.lock();
        if st.closed {
            return Err(job);
        }
        st.jobs.push_back(job);
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// Stops waiting for batches to fill (`batch_wait`): on shutdown no more requests
    /// come, so what is queued runs at once. Jobs are still accepted.
    pub fn drain(&self) {
        self.lock().draining = true;
        self.ready.notify_all();
    }

    /// Refuses new jobs; workers finish what is queued, then stop.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    fn pop(&self, st: &mut State) -> Option<Job> {
        let j = st.jobs.pop_front();
        if j.is_some() {
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        }
        j
    }

    /// Drops jobs at the front whose client has gone.
    fn drop_abandoned(&self, st: &mut State) {
        while st.jobs.front().is_some_and(|j| j.tx.is_closed()) {
            self.pop(st);
        }
    }

    fn full(&self, st: &State) -> bool {
        st.jobs.len() >= self.limits.max_batch_requests
            || st.jobs.iter().map(|j| j.tokens).sum::<usize>() >= self.limits.max_batch_tokens
    }

    /// Blocks until there is work, then takes the next batch (in arrival order); `None`
    /// once the queue is closed and empty.
    pub fn next_batch(&self) -> Option<Vec<Job>> {
        let mut st = self.lock();
        loop {
            self.drop_abandoned(&mut st);
            if st.jobs.is_empty() {
                if st.closed {
                    return None;
                }
                st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if !self.limits.batch_wait.is_zero() {
                // A wait too long to add to the clock is capped at a day.
                let now = Instant::now();
                let deadline = now
                    .checked_add(self.limits.batch_wait)
                    .unwrap_or(now + Duration::from_secs(86_400));
                while !st.closed && !st.draining && !self.full(&st) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    st = self
                        .ready
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            let mut batch: Vec<Job> = Vec::new();
            let mut tokens = 0;
            while let Some(next) = st.jobs.front() {
                if next.tx.is_closed() {
                    self.pop(&mut st);
                    continue;
                }
                if !batch.is_empty()
                    && (batch.len() >= self.limits.max_batch_requests
                        || tokens + next.tokens > self.limits.max_batch_tokens)
                {
                    break;
                }
                tokens += next.tokens;
                batch.extend(self.pop(&mut st));
            }
            if !batch.is_empty() {
                if !st.jobs.is_empty() {
                    // Another worker may take the rest.
                    self.ready.notify_one();
                }
                return Some(batch);
            }
        }
    }
}

/// Counts a worker as alive while it exists.
struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts an inference worker thread; `alive` counts the running ones.
pub fn spawn_worker(
    id: usize,
    queue: Arc<Queue>,
    predictor: Arc<Predictor>,
    metrics: Arc<Metrics>,
    alive: Arc<AtomicUsize>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    alive.fetch_add(1, Ordering::SeqCst);
    let guard = Alive(alive);
    std::thread::Builder::new()
        .name(format!("ferrotune-infer-{id}"))
        .spawn(move || {
            let _guard = guard;
            while let Some(batch) = queue.next_batch() {
                run_batch(&predictor, &metrics, batch);
            }
        })
}

fn run_batch(predictor: &Predictor, metrics: &Metrics, mut batch: Vec<Job>) {
    let sizes: Vec<usize> = batch.iter().map(|j| j.feats.len()).collect();
    let tokens: usize = batch.iter().map(|j| j.tokens).sum();
    let feats: Vec<Features> = batch
        .iter_mut()
        .flat_map(|j| std::mem::take(&mut j.feats))
        .collect();
    metrics.batch_size.observe(feats.len() as f64);
    metrics.batch_requests.observe(batch.len() as f64);
    metrics.batch_tokens.observe(tokens as f64);
    let start = Instant::now();
    let out = catch_unwind(AssertUnwindSafe(|| {
        predictor.predict_features(&feats, |_| {})
    }));
    metrics
        .inference_duration
        .observe(start.elapsed().as_secs_f64());
    match out {
        Ok(Ok(rows)) if rows.len() == feats.len() => {
            metrics
                .inputs
                .fetch_add(feats.len() as u64, Ordering::Relaxed);
            let mut rows = rows.into_iter();
            for (job, n) in batch.into_iter().zip(sizes) {
                let _ = job.tx.send(Ok(rows.by_ref().take(n).collect()));
            }
        }
        other => {
            let msg = match other {
                Ok(Ok(rows)) => format!(
                    "inference gave {} rows for {} inputs",
                    rows.len(),
                    feats.len()
                ),
                Ok(Err(e)) => format!("inference failed: {e}"),
                Err(_) => "inference failed: the worker panicked".to_string(),
            };
            for job in batch {
                let _ = job.tx.send(Err(msg.clone()));
            }
        }
    }
}
