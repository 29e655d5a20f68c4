//! [`Call`]: a pending write of the public API, run on the app's pool when
//! awaited, or inside the caller's own transaction with
//! [`execute`](Call::execute).

use std::future::IntoFuture;

use sqlx::{PgConnection, PgPool};

use crate::BoxFuture;
use crate::error::{DbContext, Result};

type Op<'a, T> =
    Box<dyn for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T>> + Send + 'a>;

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
    pool: &'a PgPool,
    op: Op<'a, T>,
}

impl<'a, T: Send + 'a> Call<'a, T> {
    pub(crate) fn new(
        pool: &'a PgPool,
        op: impl for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T>> + Send + 'a,
    ) -> Self {
        Self {
            pool,
            op: Box::new(op),
        }
    }

    /// A call that fails before reaching the database (its arguments were
    /// rejected in Rust).
    pub(crate) fn failed(pool: &'a PgPool, error: crate::Error) -> Self {
        Self::new(pool, move |_| Box::pin(async move { Err(error) }))
    }

    /// Runs the call on the given connection or transaction (`&mut tx`).
    pub async fn execute(self, conn: &mut PgConnection) -> Result<T> {
        (self.op)(conn).await
    }
}

impl<'a, T: Send + 'a> IntoFuture for Call<'a, T> {
    type Output = Result<T>;
    type IntoFuture = BoxFuture<'a, Result<T>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let mut conn = self.pool.acquire().await.db("connecting")?;
            (self.op)(&mut conn).await
        })
    }
}

impl<T> std::fmt::Debug for Call<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call").finish_non_exhaustive()
    }
}
