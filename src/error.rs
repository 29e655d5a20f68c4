//! Errors: [`Error`] for cairn's own API, [`HandlerError`] for what handlers
//! return, [`StepError`] for what a workflow's durable calls return.

use std::fmt;
use std::time::Duration;

/// An error from cairn's API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument was rejected before anything was written, in Rust or by a
    /// SQL function (SQLSTATE 22004, 22023 or 54000).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The queue, workflow or run does not exist (SQLSTATE 42704).
    #[error("{0}")]
    NotFound(String),

    /// The object is not in a state that allows this, e.g. a signal to a
    /// finished run (SQLSTATE 55000).
    #[error("{0}")]
    InvalidState(String),

    /// An idempotency key already names a run started with another input,
    /// queue or priority (SQLSTATE 23505). The message names the run and
    /// what differs.
    #[error("{0}")]
    Conflict(String),

    /// The awaited run failed.
    #[error("run {run} failed: {error}")]
    RunFailed {
        /// The run's id.
        run: uuid::Uuid,
        /// Its error.
        error: String,
    },

    /// The awaited run was cancelled.
    #[error("run {0} was cancelled")]
    RunCancelled(uuid::Uuid),

    /// The awaited run had not ended in the time given
    /// ([`App::result_within`](crate::App::result_within)); it goes on.
    #[error("run {run} had not ended after {waited:?}")]
    NotEnded {
        /// The run's id.
        run: uuid::Uuid,
        /// How long it was waited for.
        waited: Duration,
    },

    /// A stored output does not fit the type asked for.
    #[error("cannot decode {what}: {source}")]
    Deserialize {
        /// What was being decoded.
        what: &'static str,
        /// The serde error.
        source: serde_json::Error,
    },

    /// The database holds a cairn schema newer than this binary knows.
    #[error(
        "the database has cairn migration {version} applied, but this binary knows migrations only up to {known}; upgrade cairn"
    )]
    SchemaTooNew {
        /// The newest migration recorded in the database.
        version: i32,
        /// The newest migration this binary carries.
        known: i32,
    },

    /// A migration was edited after it had been applied to this database.
    #[error(
        "cairn migration {version} ({name}) differs from the one applied to this database; released migrations must never be edited"
    )]
    MigrationEdited {
        /// The migration's number.
        version: i32,
        /// The migration's file name.
        name: String,
    },

    /// Schema `cairn` (or something in it) belongs to another role: cairn
    /// will not install there.
    #[error("{0}")]
    UnsafeSchema(String),

    /// The database holds functions installed by a newer cairn release.
    #[error(
        "the database has the functions of cairn {installed}, newer than this binary's {ours}; upgrade cairn"
    )]
    FunctionsTooNew {
        /// The release that installed them.
        installed: String,
        /// This binary's release.
        ours: String,
    },

    /// Schema `cairn` was changed in a way cairn cannot put back.
    #[error("schema cairn has drifted: {0}")]
    Drift(String),

    /// A payload or output could not be serialized to JSON.
    #[error("cannot serialize {what} to JSON: {source}")]
    Serialize {
        /// What was being serialized.
        what: &'static str,
        /// The serde error.
        source: serde_json::Error,
    },

    /// The database could not be reached or a statement failed. The message
    /// carries the server's detail and hint, when it gave them.
    #[error("database error while {context}: {source}{}", db_notes(.source))]
    Database {
        /// What cairn was doing.
        context: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
}

/// `Result` with cairn's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Classifies a driver error: cairn's SQL functions raise argument errors
    /// with standard SQLSTATEs, which become typed variants here.
    /// The server's detail and hint are kept in the message: they often say
    /// what to do (`create it first: select cairn.create_queue('q')`).
    pub(crate) fn from_sqlx(context: &'static str, source: sqlx::Error) -> Self {
        if let Some(db) = source.as_database_error() {
            let message = format!(
                "{}{}",
                db.message().trim_start_matches("cairn: "),
                db_notes(&source)
            );
            match db.code().as_deref() {
                Some("42704") => return Error::NotFound(message),
                Some("55000") => return Error::InvalidState(message),
                Some("23505") => return Error::Conflict(message),
                Some("22004" | "22023" | "54000" | "22P02" | "22P05") => {
                    return Error::InvalidArgument(message);
                }
                _ => {}
            }
        }
        Error::Database { context, source }
    }
}

impl Error {
    /// The database refused outcomes that conflict with what another worker
    /// recorded (SQLSTATE CA001, raised by `cairn.record_outcomes`): the
    /// execution must replay from the record.
    pub(crate) fn is_replay_conflict(&self) -> bool {
        matches!(self, Error::Database { source, .. }
            if source.as_database_error().and_then(|e| e.code()).as_deref() == Some("CA001"))
    }
}

/// ` (detail: …; hint: …)` from a server error, or nothing.
fn db_notes(source: &sqlx::Error) -> String {
    let Some(pg) = source
        .as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
    else {
        return String::new();
    };
    let notes: Vec<String> = [("detail", pg.detail()), ("hint", pg.hint())]
        .into_iter()
        .filter_map(|(what, text)| text.map(|t| format!("{what}: {t}")))
        .collect();
    if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join("; "))
    }
}

/// Attaches a context to driver errors: `.db("claiming jobs")?`.
pub(crate) trait DbContext<T> {
    fn db(self, context: &'static str) -> Result<T>;
}

impl<T> DbContext<T> for std::result::Result<T, sqlx::Error> {
    fn db(self, context: &'static str) -> Result<T> {
        self.map_err(|e| Error::from_sqlx(context, e))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error a task handler returns.
///
/// Any error converts into a *retryable* `HandlerError` through `?`, so the
/// job is retried with its [`RetryPolicy`](crate::RetryPolicy). Mark an
/// error [`fatal`](HandlerError::fatal) to dead-letter the job at once, or
/// [`retry_after`](HandlerError::retry_after) to choose the delay. The
/// [`ResultExt`] methods do the same on a `Result`.
pub struct HandlerError {
    kind: HandlerErrorKind,
    source: BoxError,
}

/// What a [`HandlerError`] asks the worker to do with the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandlerErrorKind {
    /// Retry with the policy's backoff (dead-letter once attempts run out).
    Retryable,
    /// Retry after this delay instead of the policy's backoff.
    RetryAfter(Duration),
    /// Do not retry: dead-letter the job now.
    Fatal,
}

impl HandlerError {
    /// A retryable error.
    pub fn retryable(error: impl Into<BoxError>) -> Self {
        Self::new(HandlerErrorKind::Retryable, error)
    }

    /// A retryable error that asks for the next attempt after `delay`.
    pub fn retry_after(delay: Duration, error: impl Into<BoxError>) -> Self {
        Self::new(HandlerErrorKind::RetryAfter(delay), error)
    }

    /// A fatal error: the job is dead-lettered without further attempts.
    pub fn fatal(error: impl Into<BoxError>) -> Self {
        Self::new(HandlerErrorKind::Fatal, error)
    }

    fn new(kind: HandlerErrorKind, error: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: error.into(),
        }
    }

    /// What the worker will do with the job.
    pub fn kind(&self) -> HandlerErrorKind {
        self.kind
    }
}

/// Why a step's call returned an error to the workflow.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// The step failed for good: a fatal error, or its attempts ran out.
    #[error("step {step} failed: {message}")]
    Failed {
        /// The step's key (`name#n`).
        step: String,
        /// The handler's last error.
        message: String,
    },
    /// A recorded output or a signal payload does not fit the expected type.
    #[error("step {step}: {message}")]
    Decode {
        /// The step's key.
        step: String,
        /// serde's message.
        message: String,
    },
}

/// The message a panic carried, for errors and logs.
pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::retryable(error)
    }
}

/// `.fatal()`, `.retryable()` and `.retry_after(d)` on any `Result`.
pub trait ResultExt<T> {
    /// Turns the error into a fatal [`HandlerError`].
    fn fatal(self) -> Result<T, HandlerError>;
    /// Turns the error into a retryable [`HandlerError`].
    fn retryable(self) -> Result<T, HandlerError>;
    /// Turns the error into a [`HandlerError`] that retries after `delay`.
    fn retry_after(self, delay: Duration) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for std::result::Result<T, E> {
    fn fatal(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::fatal)
    }
    fn retryable(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::retryable)
    }
    fn retry_after(self, delay: Duration) -> Result<T, HandlerError> {
        self.map_err(|e| HandlerError::retry_after(delay, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_mark_is_retryable_and_ext_methods_classify() {
        fn parse(s: &str) -> Result<i32, HandlerError> {
            Ok(s.parse::<i32>()?)
        }
        assert_eq!(parse("x").unwrap_err().kind(), HandlerErrorKind::Retryable);
        let fatal: Result<(), _> = Err::<(), _>("bad input").fatal();
        assert_eq!(fatal.unwrap_err().kind(), HandlerErrorKind::Fatal);
        let later = Err::<(), _>("busy").retry_after(Duration::from_secs(3));
        let err = later.unwrap_err();
        assert_eq!(
            err.kind(),
            HandlerErrorKind::RetryAfter(Duration::from_secs(3))
        );
        assert_eq!(err.to_string(), "busy");
    }
}
