//! The flow API of [`App`]: step handlers, flow definitions, starting and
//! planning flows.

use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{App, Call, Start};
use crate::db;
use crate::error::{HandlerError, Result};
use crate::flow::{Flow, FlowInfo, PlannedStep};
use crate::retry::RetryPolicy;
use crate::task::JobContext;

impl App {
    /// Registers the step handler `name`, which flows name in their steps:
    /// its input is what the step's `input` selects, its output goes into
    /// the run's context under the step's name. Retried by
    /// [`RetryPolicy::default`] unless the step sets its own `retry`.
    /// Workers announce their handlers to the database when they start
    /// (and [`initialize`](Self::initialize) does), so definitions can be
    /// checked against them.
    ///
    /// ```no_run
    /// # async fn demo(app: cairn::App) -> cairn::Result<()> {
    /// app.step_handler("pay", |order: serde_json::Value, _ctx| async move {
    ///     Ok(serde_json::json!({"paid": order["total"]}))
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn step_handler<I, O, F, Fut>(&self, name: &str, handler: F) -> Result<()>
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(I, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        self.step_handler_with(name, RetryPolicy::default(), handler)
    }

    /// [`step_handler`](Self::step_handler) with its own retry policy (a
    /// step's `retry` in a definition still overrides it).
    pub fn step_handler_with<I, O, F, Fut>(
        &self,
        name: &str,
        policy: RetryPolicy,
        handler: F,
    ) -> Result<()>
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(I, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        self.inner
            .registry
            .write()
            .register_step(name, policy, handler)
    }

    /// Adds a flow to this app: [`initialize`](Self::initialize) stores it
    /// (a new version only if its definition changed). Refuses a builder
    /// mistake at once; the database checks the rest when it is stored.
    pub fn flow(&self, flow: Flow) -> Result<()> {
        flow.checked()?;
        let mut flows = self.inner.flows.lock().unwrap_or_else(|p| p.into_inner());
        flows.retain(|f| f.name() != flow.name());
        flows.push(flow);
        Ok(())
    }

    /// Stores a flow now; resolves to its version (the latest one again if
    /// the definition is unchanged). A bad definition is refused with the
    /// step and the reason ([`Error::InvalidArgument`](crate::Error::InvalidArgument),
    /// or [`Error::NotFound`](crate::Error::NotFound) for an unknown handler,
    /// flow or workflow), and nothing is stored. Needs `cairn_admin`.
    pub fn create_flow(&self, flow: &Flow) -> Call<'_, i32> {
        let (name, definition) = match flow.checked() {
            Ok(d) => (flow.name().to_owned(), d),
            Err(e) => return Call::failed(self.db(), e),
        };
        Call::new(self.db(), move |conn| {
            Box::pin(async move { db::create_flow(conn, &name, &definition).await })
        })
    }

    /// Starts a run of flow `flow`'s latest version (the same as
    /// [`start`](Self::start), which starts flows too); Postgres drives it
    /// from there. Await [`result`](Self::result) for its output.
    pub fn start_flow<'a, I: Serialize + Sync>(
        &'a self,
        flow: &'a str,
        input: &'a I,
    ) -> Start<'a, I> {
        self.start(flow, input)
    }

    /// Every stored flow, by name, with its latest version's definition.
    pub async fn list_flows(&self) -> Result<Vec<FlowInfo>> {
        db::list_flows(self.db()).await
    }

    /// The dry run of a stored flow: its steps by stage, nothing run.
    pub async fn plan_flow(&self, flow: &str) -> Result<Vec<PlannedStep>> {
        db::plan_flow(self.db(), flow).await
    }

    /// SQL that recreates the flow (its latest version) in another
    /// database.
    pub async fn export_flow(&self, flow: &str) -> Result<String> {
        db::export_flow(self.db(), flow).await
    }

    /// Announces the step handlers and stores the flows added with
    /// [`flow`](Self::flow).
    pub(crate) async fn register_flows(&self) -> Result<()> {
        let handlers = self.inner.registry.read().step_handlers();
        for name in handlers {
            db::register_step_handler(self.db(), &name).await?;
        }
        let flows = self
            .inner
            .flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for flow in flows {
            db::create_flow(self.db(), flow.name(), &flow.checked()?).await?;
        }
        Ok(())
    }
}
