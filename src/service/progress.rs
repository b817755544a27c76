//! WatchRotation's progress, one reader per job per process.
//!
//! The first stream on a job starts a poller that reads the job row every
//! [`POLL`] and publishes it on a `tokio::sync::watch` channel; every other
//! stream on that job in this process follows the same channel, so a
//! thousand dashboards cost the database what one does. The poller stops
//! when its last stream is gone or the job has ended (a later stream
//! starts a new one). A stream yields when the job changed, and at least
//! every [`HEARTBEAT`] (so a stalled job still shows it is watched); it
//! ends after the job's terminal state. A database error does not end the
//! streams: the poller tries again at the next tick.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use futures::Stream;
use tokio::sync::watch;

use chrono::Utc;

use crate::{
    error::{Error, Result},
    rotation::RotationJob,
    store::Store,
};

/// How often a job's poller reads its row.
pub const POLL: Duration = Duration::from_millis(200);
/// The longest a stream goes without a message.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// One WatchRotation event.
#[derive(Debug, Clone)]
pub struct Progress {
    pub job: RotationJob,
    /// Rows per second since the job started.
    pub rows_per_second: f64,
    /// Seconds left at that rate; `None` when unknown.
    pub eta_seconds: Option<f64>,
}

impl Progress {
    /// The progress of `job` as of now.
    pub fn of(job: RotationJob) -> Self {
        let elapsed = job
            .started_at
            .map(|s| {
                (job.completed_at.unwrap_or_else(Utc::now) - s).num_milliseconds() as f64 / 1000.0
            })
            .unwrap_or(0.0);
        let rows_per_second = if elapsed > 0.0 {
            job.counts.processed as f64 / elapsed
        } else {
            0.0
        };
        let remaining = (job.counts.total - job.counts.processed).max(0) as f64;
        let eta_seconds = if job.status.is_terminal() {
            Some(0.0)
        } else if rows_per_second > 0.0 {
            Some(remaining / rows_per_second)
        } else {
            None
        };
        Self {
            job,
            rows_per_second,
            eta_seconds,
        }
    }
}

/// What a poller last read of its job; `None`: the row is gone (deleted
/// by hand).
type Snapshot = Option<RotationJob>;

/// Whether nothing more will follow `snapshot`.
fn is_final(snapshot: &Snapshot) -> bool {
    snapshot.as_ref().is_none_or(|job| job.status.is_terminal())
}

/// The pollers of this process, one per watched job.
pub struct ProgressHub {
    store: Store,
    jobs: Mutex<HashMap<String, Arc<watch::Sender<Snapshot>>>>,
    reads: AtomicU64,
}

impl ProgressHub {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            jobs: Mutex::default(),
            reads: AtomicU64::new(0),
        }
    }

    /// Job-row reads made for watchers so far (the fan-out's cost).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The progress of job `id`: now, then as it changes, to its end.
    /// JOB_NOT_FOUND when there is no such job.
    pub async fn watch(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<impl Stream<Item = Result<Progress>> + Send + 'static> {
        let receiver = match self.subscribe(id) {
            Some(receiver) => receiver,
            None => {
                let first = self
                    .read(id)
                    .await?
                    .ok_or_else(|| Error::JobNotFound(id.to_owned()))?;
                self.start_or_join(id, first)
            }
        };
        Ok(follow(receiver, id.to_owned()))
    }

    fn subscribe(&self, id: &str) -> Option<watch::Receiver<Snapshot>> {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.get(id).map(|sender| sender.subscribe())
    }

    /// Joins the poller another stream started meanwhile, or starts one
    /// from `first` (none for a job that has ended: `first` is all there is).
    fn start_or_join(self: &Arc<Self>, id: &str, first: RotationJob) -> watch::Receiver<Snapshot> {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = jobs.get(id) {
            return sender.subscribe();
        }
        let snapshot = Some(first);
        let final_already = is_final(&snapshot);
        let (sender, receiver) = watch::channel(snapshot);
        if !final_already {
            let sender = Arc::new(sender);
            jobs.insert(id.to_owned(), Arc::clone(&sender));
            tokio::spawn(Arc::clone(self).poll(id.to_owned(), sender));
        }
        receiver
    }

    async fn read(&self, id: &str) -> Result<Snapshot> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(self.store.get_job(id).await?)
    }

    /// Reads the job every [`POLL`] while anyone watches and it runs.
    async fn poll(self: Arc<Self>, id: String, sender: Arc<watch::Sender<Snapshot>>) {
        loop {
            tokio::time::sleep(POLL).await;
            if self.stop_if_unwatched(&id, &sender) {
                return;
            }
            match self.read(&id).await {
                Ok(snapshot) => {
                    let last = is_final(&snapshot);
                    sender.send_if_modified(|current| {
                        let changed = *current != snapshot;
                        *current = snapshot;
                        changed
                    });
                    if last {
                        self.forget(&id);
                        return;
                    }
                }
                Err(err) => {
                    tracing::warn!(job = %id, error = %err, "reading the rotation job for its watchers failed; trying again");
                }
            }
        }
    }

    /// Removes the job's poller when no stream follows it (checked under
    /// the lock a new stream subscribes under).
    fn stop_if_unwatched(&self, id: &str, sender: &watch::Sender<Snapshot>) -> bool {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if sender.receiver_count() > 0 {
            return false;
        }
        jobs.remove(id);
        true
    }

    fn forget(&self, id: &str) {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.remove(id);
    }
}

/// One stream over a job's channel: its value now, then on each change and
/// at least every [`HEARTBEAT`], until the final one.
fn follow(
    receiver: watch::Receiver<Snapshot>,
    id: String,
) -> impl Stream<Item = Result<Progress>> + Send + 'static {
    struct State {
        receiver: watch::Receiver<Snapshot>,
        id: String,
        first: bool,
        done: bool,
    }
    let state = State {
        receiver,
        id,
        first: true,
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        if !st.first {
            // A change, or a heartbeat.
            if let Ok(Err(_)) = tokio::time::timeout(HEARTBEAT, st.receiver.changed()).await {
                // The poller is gone, which it only is once the job has
                // ended; should that ever not hold, beat, do not spin.
                if !is_final(&st.receiver.borrow()) {
                    tokio::time::sleep(HEARTBEAT).await;
                }
            }
        }
        st.first = false;
        let snapshot = st.receiver.borrow_and_update().clone();
        st.done = is_final(&snapshot);
        let item = snapshot
            .map(Progress::of)
            .ok_or_else(|| Error::JobNotFound(st.id.clone()));
        Some((item, st))
    })
}
