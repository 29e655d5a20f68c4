//! How statements reach Postgres: straight from the pool, or through a
//! transaction-pooling PgBouncer.
//!
//! sqlx sends a statement in two round trips: it prepares it (Parse,
//! Describe, Sync), then binds and runs it (Bind, Execute, Sync); and it keeps
//! prepared statements by name for reuse on the same connection. A pooler in
//! transaction mode breaks both: after the first Sync, outside a transaction,
//! it may give the server connection to another client, so the Bind can land
//! on a server that has another statement, or none; and a named statement
//! lives on one server connection while the client's next transaction may be
//! given another. PgBouncer tracks prepared statements only from 1.21 on;
//! Debian 12 ships 1.18.
//!
//! So behind such a pooler cairn sends every statement unnamed (prepared for
//! that one use, nothing left on the server) and, when it is not already in
//! the caller's transaction, inside a transaction of its own, which keeps one
//! server connection for both round trips. That costs three round trips more
//! per call (BEGIN, the prepare, COMMIT). `LISTEN` needs a session and
//! migrations take session-wide care, so both connect to Postgres directly.

use futures_util::{StreamExt, TryStreamExt, stream};
use sqlx::error::BoxDynError;
use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgQueryResult, PgRow, PgStatement, PgTypeInfo,
};
use sqlx::{Describe, Either, Execute, Executor, PgPool, Postgres, SqlStr};

type Stream<'e> =
    futures_util::stream::BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>;
type Future<'e, T> = futures_util::future::BoxFuture<'e, Result<T, sqlx::Error>>;

/// The app's way to the database: its pool, and, behind a transaction
/// pooler, the direct address for `LISTEN` and migrations. `&Db` is an
/// executor that sends each statement the way the pool needs.
#[derive(Clone, Debug)]
pub(crate) struct Db {
    pool: PgPool,
    /// Postgres itself, when the pool goes through a transaction pooler.
    direct: Option<PgConnectOptions>,
}

impl Db {
    pub(crate) fn new(pool: PgPool, direct: Option<PgConnectOptions>) -> Self {
        Self { pool, direct }
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether the pool goes through a transaction pooler.
    pub(crate) fn pooled(&self) -> bool {
        self.direct.is_some()
    }

    /// Behind a transaction pooler, Postgres itself: where a session of its
    /// own (LISTEN, migrations) connects.
    pub(crate) fn direct(&self) -> Option<&PgConnectOptions> {
        self.direct.as_ref()
    }

    /// The caller's executor (a connection, a transaction), its statements
    /// sent as this pool needs.
    pub(crate) fn on<E>(&self, executor: E) -> Via<E> {
        Via {
            executor,
            unnamed: self.pooled(),
        }
    }
}

impl<'c> Executor<'c> for &'c Db {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> Stream<'e>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.pooled() {
            return self.pool.fetch_many(query);
        }
        let pool = self.pool.clone();
        let query = OneShot::new(query);
        stream::once(async move {
            let mut tx = pool.begin().await?;
            let out: Vec<_> = tx.fetch_many(query).try_collect().await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(stream::iter(out.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> Future<'e, Option<PgRow>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.pooled() {
            return self.pool.fetch_optional(query);
        }
        let pool = self.pool.clone();
        let query = OneShot::new(query);
        Box::pin(async move {
            let mut tx = pool.begin().await?;
            let row = tx.fetch_optional(query).await?;
            tx.commit().await?;
            Ok(row)
        })
    }

    fn prepare_with<'e>(self, sql: SqlStr, parameters: &'e [PgTypeInfo]) -> Future<'e, PgStatement>
    where
        'c: 'e,
    {
        self.pool.prepare_with(sql, parameters)
    }

    fn describe<'e>(self, sql: SqlStr) -> Future<'e, Describe<Postgres>>
    where
        'c: 'e,
    {
        self.pool.describe(sql)
    }
}

/// An executor whose statements are sent unnamed when `unnamed` is set:
/// the caller's own connection or transaction behind a transaction pooler.
#[derive(Debug)]
pub(crate) struct Via<E> {
    executor: E,
    unnamed: bool,
}

impl<'c, X> Executor<'c> for Via<X>
where
    X: Executor<'c, Database = Postgres>,
{
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> Stream<'e>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if self.unnamed {
            self.executor.fetch_many(OneShot::new(query))
        } else {
            self.executor.fetch_many(query)
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> Future<'e, Option<PgRow>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if self.unnamed {
            self.executor.fetch_optional(OneShot::new(query))
        } else {
            self.executor.fetch_optional(query)
        }
    }

    fn prepare_with<'e>(self, sql: SqlStr, parameters: &'e [PgTypeInfo]) -> Future<'e, PgStatement>
    where
        'c: 'e,
    {
        self.executor.prepare_with(sql, parameters)
    }

    fn describe<'e>(self, sql: SqlStr) -> Future<'e, Describe<Postgres>>
    where
        'c: 'e,
    {
        self.executor.describe(sql)
    }
}

/// A query sent unnamed: prepared for this one execution, not kept.
struct OneShot {
    sql: SqlStr,
    arguments: Option<Result<Option<PgArguments>, BoxDynError>>,
}

impl OneShot {
    fn new<'q, E: Execute<'q, Postgres>>(mut query: E) -> Self {
        let arguments = Some(query.take_arguments());
        Self {
            sql: query.sql(),
            arguments,
        }
    }
}

impl Execute<'_, Postgres> for OneShot {
    fn sql(self) -> SqlStr {
        self.sql
    }

    fn statement(&self) -> Option<&PgStatement> {
        None
    }

    fn take_arguments(&mut self) -> Result<Option<PgArguments>, BoxDynError> {
        self.arguments.take().unwrap_or(Ok(None))
    }

    fn persistent(&self) -> bool {
        false
    }
}
