//! [`Call`]: a pending write of the public API, run on the app's pool when
//! awaited, or inside the caller's own transaction with
//! [`execute`](Call::execute).

use std::future::IntoFuture;

use sqlx::PgConnection;

use crate::BoxFuture;
use crate::error::{DbContext, Result};
use crate::pooler::{Db, Via};

/// What a call does, given a connection (its statements sent as the app's
/// pool needs).
pub(crate) type Op<'a, T> =
    Box<dyn for<'c> FnOnce(Via<&'c mut PgConnection>) -> BoxFuture<'c, Result<T>> + Send + 'a>;

/// A pending write: await it to run it on the app's pool, or call
/// [`execute`](Self::execute) with your own connection or transaction, so
/// that it takes effect if and only if your transaction commits.
///
/// ```no_run
/// # async fn demo(app: cairn::App, run: cairn::Uuid) -> cairn::Result<()> {
/// app.send_signal(run, "approved", &"ann").await?; // on the pool
/// let mut tx = app.pool().begin().await.unwrap();
/// app.cancel_run(run).execute(&mut tx).await?;     // in your transaction
/// tx.commit().await.unwrap();
/// # Ok(()) }
/// ```
#[must_use = "a call does nothing until awaited or executed"]
pub struct Call<'a, T> {
    db: &'a Db,
    op: Op<'a, T>,
}

impl<'a, T: Send + 'a> Call<'a, T> {
    pub(crate) fn new(
        db: &'a Db,
        op: impl for<'c> FnOnce(Via<&'c mut PgConnection>) -> BoxFuture<'c, Result<T>> + Send + 'a,
    ) -> Self {
        Self {
            db,
            op: Box::new(op),
        }
    }

    /// A call that fails before reaching the database (its arguments were
    /// rejected in Rust).
    pub(crate) fn failed(db: &'a Db, error: crate::Error) -> Self {
        Self::new(db, move |_| Box::pin(async move { Err(error) }))
    }

    /// Runs the call on the given connection or transaction (`&mut tx`).
    pub async fn execute(self, conn: &mut PgConnection) -> Result<T> {
        (self.op)(self.db.on(conn)).await
    }
}

impl<'a, T: Send + 'a> IntoFuture for Call<'a, T> {
    type Output = Result<T>;
    type IntoFuture = BoxFuture<'a, Result<T>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            if self.db.pooled() {
                // Behind a transaction pooler: one transaction keeps one
                // server connection for the whole call.
                let mut tx = self.db.pool().begin().await.db("connecting")?;
                let out = (self.op)(self.db.on(&mut tx)).await?;
                tx.commit().await.db("committing")?;
                return Ok(out);
            }
            let mut conn = self.db.pool().acquire().await.db("connecting")?;
            (self.op)(self.db.on(&mut conn)).await
        })
    }
}

impl<T> std::fmt::Debug for Call<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call").finish_non_exhaustive()
    }
}
