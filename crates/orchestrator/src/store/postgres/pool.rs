//! The connections of the PostgreSQL store: a fixed number of std threads,
//! each owning one synchronous `postgres::Client`, taking jobs from one
//! bounded queue and answering each on a channel of its own.
//!
//! Why threads: [`Store`](crate::store::Store) is synchronous and is called
//! from async code on tokio runtimes (current-thread ones in tests), while
//! `postgres::Client` runs a runtime of its own inside every call, which
//! tokio forbids on a thread that is already in one. On its own thread the
//! client blocks only that thread; the caller blocks on the answer as long
//! as the query takes, as it does on SQLite's disk I/O.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, NoTls, Statement, Transaction};
use tokio::runtime::RuntimeFlavor;

use crate::store::{StoreError, StoreResult};

/// Jobs waiting for a connection, per connection; past them a caller waits
/// to queue its job.
const QUEUED_JOBS_PER_CONNECTION: usize = 16;
/// Longest wait for a connection to be made.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a statement may run before the server cancels it.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a caller waits for its answer: a statement's limit, and room for
/// the jobs queued before it and for connecting.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a job failed, before the URL is put on it.
#[derive(Debug)]
pub(super) enum Failure {
    Sql(postgres::Error),
    Store(StoreError),
    /// The database's schema is newer than the migrations known here.
    NewerSchema {
        found: i64,
        supported: i64,
    },
    /// A write of the leader of `term` after another took the lease over.
    Fenced {
        term: i64,
    },
}

impl From<postgres::Error> for Failure {
    fn from(error: postgres::Error) -> Self {
        Self::Sql(error)
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

impl Failure {
    /// The connection was closed, or the server ended the session (class
    /// 57P: shut down, crashed): the statement did not run on it.
    fn is_connection_lost(&self) -> bool {
        match self {
            Self::Sql(error) => {
                error.is_closed()
                    || error
                        .code()
                        .is_some_and(|code| code.code().starts_with("57P"))
            }
            _ => false,
        }
    }

    fn into_store_error(self, url: &str) -> StoreError {
        match self {
            Self::Sql(error) => StoreError::Postgres {
                url: url.to_string(),
                reason: describe(&error),
            },
            Self::Store(error) => error,
            Self::NewerSchema { found, supported } => StoreError::NewerSchema {
                url: url.to_string(),
                found,
                supported,
            },
            Self::Fenced { term } => StoreError::Fenced {
                url: url.to_string(),
                term,
            },
        }
    }
}

pub(super) type PgResult<T> = Result<T, Failure>;

/// The server's own message (with its detail) when it sent one, else the
/// client's, with what caused it (refused, timed out, …).
fn describe(error: &postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.severity(), db.message()),
            None => format!("{}: {}", db.severity(), db.message()),
        };
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The threads and their queue; dropping it ends the threads once their
/// jobs are done.
pub(super) struct Pool {
    jobs: SyncSender<Job>,
    /// The leader lease's term this orchestrator writes under; 0 while it
    /// holds none (a lone orchestrator: nothing to fence).
    fence: Arc<AtomicI64>,
    /// `store.url` with its password hidden, for every error.
    url: Arc<str>,
}

impl Pool {
    /// Starts `connections` threads; they connect on their first job.
    pub(super) fn start(config: postgres::Config, url: String, connections: usize) -> Self {
        let connections = connections.max(1);
        let (jobs, queue) = sync_channel::<Job>(connections * QUEUED_JOBS_PER_CONNECTION);
        let queue = Arc::new(Mutex::new(queue));
        let mut config = config;
        // Added to the URL's own `options`, if it has any.
        let timeout = format!("-c statement_timeout={}", STATEMENT_TIMEOUT.as_millis());
        let options = match config.get_options() {
            Some(given) => format!("{given} {timeout}"),
            None => timeout,
        };
        config.connect_timeout(CONNECT_TIMEOUT).options(&options);
        let url: Arc<str> = url.into();
        let fence = Arc::new(AtomicI64::new(0));
        for index in 0..connections {
            let queue = Arc::clone(&queue);
            let connection = Connection {
                config: config.clone(),
                fence: Arc::clone(&fence),
                session: None,
            };
            let spawned = std::thread::Builder::new()
                .name(format!("postgres-store-{index}"))
                .spawn(move || serve(&queue, connection));
            if let Err(error) = spawned {
                tracing::error!(%error, "could not start a PostgreSQL store thread");
            }
        }
        Self { jobs, fence, url }
    }

    /// From now on every write checks, in its transaction, that the lease
    /// is still at `term`.
    pub(super) fn fence_at(&self, term: i64) {
        self.fence.store(term, Ordering::SeqCst);
    }

    pub(super) fn fenced_term(&self) -> i64 {
        self.fence.load(Ordering::SeqCst)
    }

    pub(super) fn url(&self) -> &str {
        &self.url
    }

    /// Runs `job` on a connection and waits for its answer. A job that
    /// finds its connection lost (the server restarted: a connection learns
    /// it only when next used) runs once more on a new one: the server ran
    /// none of it, or rolled it back, unless it lost the answer to a COMMIT
    /// it did apply; then the second try finds the write already there (a
    /// transition's state moved, a row present) as a racing writer would.
    pub(super) fn call<T: Send + 'static>(
        &self,
        job: impl Fn(&mut Session) -> PgResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let (answer, answered) = sync_channel(1);
        let url = Arc::clone(&self.url);
        let job: Job = Box::new(move |connection: &mut Connection| {
            let result = match connection.run(&job) {
                Err(failure) if failure.is_connection_lost() => {
                    connection.session = None;
                    connection.run(&job)
                }
                result => result,
            };
            if result.is_err() {
                connection.forget_if_broken();
            }
            let _ = answer.send(result.map_err(|failure| failure.into_store_error(&url)));
        });
        let gone = || self.failed("the store's connection threads are gone");
        self.jobs.send(job).map_err(|_| gone())?;
        let wait = || answered.recv_timeout(ANSWER_TIMEOUT);
        // The scheduler's tasks call from tokio's worker threads (as many as
        // cores): waiting there for a round trip would hold up every other
        // backend's task queued on that worker, so the worker's other tasks
        // move to another thread while this one waits. A current-thread
        // runtime (tests) has nowhere to move them.
        let answer = match tokio::runtime::Handle::try_current() {
            Ok(runtime) if runtime.runtime_flavor() == RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        match answer {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                Err(self.failed(&format!("no answer within {} s", ANSWER_TIMEOUT.as_secs())))
            }
            Err(RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }

    fn failed(&self, reason: &str) -> StoreError {
        StoreError::Postgres {
            url: self.url.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// A connection and the statements prepared on it: a job derefs to the
/// client, and prepares the statements of the hot path (a run's transition,
/// its campaign's counts) once per connection instead of at every call.
pub(super) struct Session {
    client: Client,
    /// Bounded by the store's statements: their SQL is fixed text.
    statements: HashMap<String, Statement>,
    fence: Arc<AtomicI64>,
}

/// Locks the lease row while a write's transaction runs: a takeover (which
/// moves the term on) waits for the writes of the old term in flight, and
/// every write after it finds the term moved and is refused.
const FENCE_SQL: &str = "SELECT 1 FROM leader_lease WHERE id = 1 AND term = $1 FOR SHARE";

impl Session {
    /// A transaction for writes: fenced by the leader lease's term when
    /// this orchestrator leads (shadows the client's own `transaction`, so
    /// every write of the store goes through the fence).
    pub(super) fn transaction(&mut self) -> PgResult<Transaction<'_>> {
        let term = self.fence_term();
        if term == 0 {
            return Ok(self.client.transaction()?);
        }
        let check = self.prepared(FENCE_SQL)?;
        let mut tx = self.client.transaction()?;
        if tx.query_opt(&check, &[&term])?.is_none() {
            return Err(Failure::Fenced { term });
        }
        Ok(tx)
    }

    /// One statement that writes, fenced as [`Self::transaction`] is.
    pub(super) fn write(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> PgResult<u64> {
        if self.fence_term() == 0 {
            return Ok(self.client.execute(sql, params)?);
        }
        let mut tx = self.transaction()?;
        let written = tx.execute(sql, params)?;
        tx.commit()?;
        Ok(written)
    }

    /// The term this connection's writes are fenced at (0: none).
    pub(super) fn fence_term(&self) -> i64 {
        self.fence.load(Ordering::SeqCst)
    }

    /// The client itself, for what must not be fenced (the lease).
    pub(super) fn unfenced(&mut self) -> &mut Client {
        &mut self.client
    }

    /// `sql` prepared on this connection, once.
    pub(super) fn prepared(&mut self, sql: &str) -> PgResult<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

impl Deref for Session {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// One thread's connection, made again when it was lost.
struct Connection {
    config: postgres::Config,
    fence: Arc<AtomicI64>,
    session: Option<Session>,
}

impl Connection {
    fn run<T>(&mut self, job: &impl Fn(&mut Session) -> PgResult<T>) -> PgResult<T> {
        let session = self.session()?;
        std::panic::catch_unwind(AssertUnwindSafe(|| job(session))).unwrap_or_else(|_| {
            Err(Failure::Store(StoreError::Database(
                "a PostgreSQL store thread panicked".into(),
            )))
        })
    }

    fn session(&mut self) -> PgResult<&mut Session> {
        if self.session.as_ref().is_some_and(|s| s.client.is_closed()) {
            self.session = None;
        }
        let session = match self.session.take() {
            Some(session) => session,
            None => Session {
                client: self.config.connect(NoTls)?,
                statements: HashMap::new(),
                fence: Arc::clone(&self.fence),
            },
        };
        Ok(self.session.insert(session))
    }

    /// Drops a connection that a failed job left closed or in a state no
    /// later job should inherit; the next job connects again.
    fn forget_if_broken(&mut self) {
        if let Some(session) = &mut self.session
            && (session.client.is_closed() || session.client.is_valid(CONNECT_TIMEOUT).is_err())
        {
            self.session = None;
        }
    }
}

fn serve(queue: &Mutex<Receiver<Job>>, mut connection: Connection) {
    loop {
        let job = {
            let queue = queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.recv()
        };
        match job {
            Ok(job) => job(&mut connection),
            // The store was dropped.
            Err(_) => return,
        }
    }
}

/// `url` with the password of its user info replaced by `***`, to be shown.
pub(super) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((user_info, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    match user_info.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn only_the_password_is_hidden() {
        assert_eq!(
            redact("postgres://berth:s3cr:et@db.example:5432/berth?sslmode=disable"),
            "postgres://berth:***@db.example:5432/berth?sslmode=disable"
        );
        assert_eq!(
            redact("postgres://berth@db/berth"),
            "postgres://berth@db/berth"
        );
        assert_eq!(redact("postgresql://db/x"), "postgresql://db/x");
    }
}
