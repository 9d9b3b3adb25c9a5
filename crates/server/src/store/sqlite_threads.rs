//! SQLite connections on OS threads of their own, fed by one queue of jobs: a job is a
//! closure handed to a thread and, through `run`, one answer back (`spawn` waits for
//! none: the committer's loop, which keeps its thread until it ends). A thread runs every waiting job before
//! it sleeps again, so a burst costs a wake-up or two, not one per job. The commit thread
//! (`sqlite_writer`) is one such thread; the connect reads (`sqlite_reader`) are a few.
//!
//! Why not sqlx's SQLite connections, which also run on worker threads: sqlx sends every
//! statement's result and every row back to the async side one by one, and with the server
//! on one core each send can cost two thread switches. Here a job is two, whatever it
//! reads or writes, and its statements are prepared once per connection
//! (`prepare_cached`) and bound per use.

use std::sync::{mpsc, Arc, Mutex, PoisonError};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::StoreError;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The handle on the threads. They end when the handle is dropped (after the jobs already
/// queued).
pub(super) struct ConnThreads {
    jobs: mpsc::Sender<Job>,
    /// What `run` answers when no thread is left to run a job.
    gone: fn() -> StoreError,
}

impl ConnThreads {
    /// Start `threads` threads named `name`, each on a connection of its own from `open`.
    pub fn start(
        name: &str,
        threads: usize,
        mut open: impl FnMut() -> rusqlite::Result<Connection>,
        gone: fn() -> StoreError,
    ) -> Result<Self, StoreError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..threads.max(1) {
            let mut conn = open()?;
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || loop {
                    // The lock is held only while waiting for a job, not while running it.
                    let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    match job {
                        Ok(job) => job(&mut conn),
                        Err(mpsc::RecvError) => return,
                    }
                })?;
        }
        Ok(Self { jobs, gone })
    }

    /// Start `job` on one of the threads, without waiting for it.
    pub fn spawn(
        &self,
        job: impl FnOnce(&mut Connection) + Send + 'static,
    ) -> Result<(), StoreError> {
        self.jobs.send(Box::new(job)).map_err(|_| (self.gone)())
    }

    /// Run `job` on one of the threads and wait for its answer.
    pub async fn run<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, outcome) = oneshot::channel();
        self.spawn(move |conn| {
            let _ignored_if_the_caller_is_gone = answer.send(job(conn));
        })?;
        outcome.await.unwrap_or_else(|_| Err((self.gone)()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threads(n: usize) -> ConnThreads {
        ConnThreads::start("test-sqlite", n, Connection::open_in_memory, || {
            StoreError::ReaderGone
        })
        .expect("in-memory connections open")
    }

    #[tokio::test]
    async fn a_job_runs_on_a_thread_connection_and_its_answer_comes_back() {
        let threads = threads(2);
        let sum: i64 = threads
            .run(|conn| Ok(conn.query_row("SELECT 40 + 2", [], |row| row.get(0))?))
            .await
            .expect("the job ran");
        assert_eq!(sum, 42);
        let name = threads
            .run(|_| Ok(std::thread::current().name().map(str::to_owned)))
            .await
            .expect("the job ran");
        assert_eq!(name.as_deref(), Some("test-sqlite"));
    }

    #[tokio::test]
    async fn an_error_of_the_job_is_its_answer() {
        let threads = threads(1);
        let failed = threads
            .run(
                |conn| Ok(conn.query_row("SELECT * FROM missing", [], |row| row.get::<_, i64>(0))?),
            )
            .await;
        assert!(matches!(failed, Err(StoreError::Sqlite(_))), "{failed:?}");
    }

    #[tokio::test]
    async fn a_job_whose_thread_dies_answers_gone() {
        let threads = threads(1);
        let died = threads
            .run(|_| -> Result<(), StoreError> { panic!("the job panics on purpose") })
            .await;
        assert!(matches!(died, Err(StoreError::ReaderGone)), "{died:?}");
        let after = threads.run(|_| Ok(())).await;
        assert!(matches!(after, Err(StoreError::ReaderGone)), "{after:?}");
    }
}
