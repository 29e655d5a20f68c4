//! Flows: workflows defined as data, which Postgres drives. [`Flow`] builds
//! the same JSON definition `cairn.create_flow` stores.

use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::error::{Error, Result};

/// A flow definition, built step by step. Each step runs a step handler
/// (registered with [`App::step_handler`](crate::App::step_handler)), a
/// sub-flow, a code-first workflow, or waits for a signal; the methods after
/// [`step`](Self::step) shape the step added last.
///
/// Conditions and inputs are paths in Postgres's SQL/JSON path language,
/// read against the run's context: `{"input": <the run's input>, "<step>":
/// <its output>, ...}` for every completed step (`$item` and `$index` in a
/// map). The database checks the whole definition when it is stored.
///
/// ```
/// use cairn::Flow;
///
/// let flow = Flow::new("create_order")
///     .step("get_product").input("$.input.product_id")
///     .step("pay").after(["get_product"]).when("$.get_product.price > 0")
///     .step("ship").after(["pay"]).map("$.input.parcels");
/// assert_eq!(flow.definition()["steps"][1]["when"], "$.get_product.price > 0");
/// ```
#[derive(Clone, Debug)]
pub struct Flow {
    name: String,
    top: Map<String, Value>,
    steps: Vec<Map<String, Value>>,
    error: Option<String>,
}

impl Flow {
    /// A flow named `name`, with no steps yet.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            top: Map::new(),
            steps: Vec::new(),
            error: None,
        }
    }

    /// The flow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue its steps go to unless a step names another (default
    /// `workflows`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.top.insert("queue".into(), Value::String(queue.into()));
        self
    }

    /// A path selecting the run's output from the context (default: every
    /// step's output by name).
    pub fn output(mut self, path: impl Into<String>) -> Self {
        self.top.insert("output".into(), Value::String(path.into()));
        self
    }

    /// A description, kept with the definition.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.top
            .insert("description".into(), Value::String(text.into()));
        self
    }

    /// Adds a step named `name` that runs the step handler of the same name
    /// (see [`handler`](Self::handler) to run another).
    pub fn step(mut self, name: impl Into<String>) -> Self {
        let mut step = Map::new();
        step.insert("name".into(), Value::String(name.into()));
        self.steps.push(step);
        self
    }

    /// The last step runs the step handler `handler`.
    pub fn handler(self, handler: impl Into<String>) -> Self {
        self.runs("handler", handler.into())
    }

    /// The last step runs flow `flow` as a child run; its output is the
    /// child's.
    pub fn sub_flow(self, flow: impl Into<String>) -> Self {
        self.runs("flow", flow.into())
    }

    /// The last step runs the code-first workflow `workflow` as a child run.
    pub fn workflow(self, workflow: impl Into<String>) -> Self {
        self.runs("workflow", workflow.into())
    }

    /// The last step waits for a signal named `signal` (sent with
    /// [`App::send_signal`](crate::App::send_signal) or `cairn.send_signal`); its
    /// output is `{"payload": ...}`, or with a [`timeout`](Self::timeout)
    /// that ran out, `{"timeout": true}`.
    pub fn signal(self, signal: impl Into<String>) -> Self {
        self.runs("signal", signal.into())
    }

    /// The last step starts once all these steps are completed or skipped.
    pub fn after<S: Into<String>>(self, steps: impl IntoIterator<Item = S>) -> Self {
        let after: Vec<Value> = steps.into_iter().map(|s| Value::String(s.into())).collect();
        self.set("after", Value::Array(after))
    }

    /// The last step runs only if this path predicate holds on the context
    /// (e.g. `$.review.approved == true`); otherwise it is skipped, and the
    /// steps after it still run.
    pub fn when(self, predicate: impl Into<String>) -> Self {
        self.set("when", Value::String(predicate.into()))
    }

    /// The last step's input: the value at this path (default: the whole
    /// context; in a map, the element).
    pub fn input(self, path: impl Into<String>) -> Self {
        self.set("input", Value::String(path.into()))
    }

    /// The last step's input is an object; this field is the value at `path`.
    pub fn input_field(mut self, field: impl Into<String>, path: impl Into<String>) -> Self {
        let Some(step) = self.last("input_field") else {
            return self;
        };
        let entry = step
            .entry("input")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(fields) = entry {
            fields.insert(field.into(), Value::String(path.into()));
        } else {
            self.error = Some("input_field after input: use one or the other".into());
        }
        self
    }

    /// The last step runs once per element of the array at `path`, in
    /// parallel; its output is their outputs, in order.
    pub fn map(self, path: impl Into<String>) -> Self {
        self.set("map", Value::String(path.into()))
    }

    /// The queue the last step's jobs go to.
    pub fn step_queue(self, queue: impl Into<String>) -> Self {
        self.set("queue", Value::String(queue.into()))
    }

    /// The last step's retries: `max_attempts` in all, the first retry after
    /// `backoff`, doubling, at most `max_backoff` apart. Overrides the
    /// handler's own policy.
    pub fn retry(self, max_attempts: u32, backoff: Duration, max_backoff: Duration) -> Self {
        self.set(
            "retry",
            json!({
                "max_attempts": max_attempts,
                "backoff": backoff.as_secs_f64(),
                "max_backoff": max_backoff.as_secs_f64(),
            }),
        )
    }

    /// An attempt of the last step that runs longer fails (and is
    /// retried); for a signal step, how long it waits before it completes
    /// with `{"timeout": true}`.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.set("timeout", json!(timeout.as_secs_f64()))
    }

    /// When the last step completes, the run goes back to `step` (this step
    /// or one it waits for) and runs it and everything after it again, at
    /// most `max` times.
    pub fn goto(self, step: impl Into<String>, max: u32) -> Self {
        self.set("goto", json!({"step": step.into(), "max": max}))
    }

    /// [`goto`](Self::goto), only when this path predicate holds on the
    /// context.
    pub fn goto_when(
        self,
        step: impl Into<String>,
        predicate: impl Into<String>,
        max: u32,
    ) -> Self {
        self.set(
            "goto",
            json!({"step": step.into(), "when": predicate.into(), "max": max}),
        )
    }

    /// The definition, as `cairn.create_flow` takes it.
    pub fn definition(&self) -> Value {
        let mut top = self.top.clone();
        top.insert(
            "steps".into(),
            Value::Array(self.steps.iter().cloned().map(Value::Object).collect()),
        );
        Value::Object(top)
    }

    /// The definition, or the builder's own mistake (a step method called
    /// before any step).
    pub(crate) fn checked(&self) -> Result<Value> {
        match &self.error {
            Some(e) => Err(Error::InvalidArgument(format!("flow {:?}: {e}", self.name))),
            None => Ok(self.definition()),
        }
    }

    fn runs(self, kind: &str, target: String) -> Self {
        self.set(kind, Value::String(target))
    }

    fn set(mut self, key: &str, value: Value) -> Self {
        if let Some(step) = self.last(key) {
            step.insert(key.into(), value);
        }
        self
    }

    fn last(&mut self, what: &str) -> Option<&mut Map<String, Value>> {
        if self.steps.is_empty() {
            self.error
                .get_or_insert_with(|| format!("{what} before any step: call .step(name) first"));
        }
        self.steps.last_mut()
    }
}

/// A stored flow, from [`App::list_flows`](crate::App::list_flows).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct FlowInfo {
    /// Its name.
    pub name: String,
    /// Its latest version (new runs start on it).
    pub version: i32,
    /// How many steps that version has.
    pub steps: i32,
    /// The queue its steps' jobs go to by default.
    pub queue: Option<String>,
    /// The latest version's definition, as JSON text.
    #[serde(serialize_with = "crate::json::embedded")]
    pub definition: String,
    /// When it was first stored.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When its latest version was stored.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// One step of a flow's dry run ([`App::plan_flow`](crate::App::plan_flow)).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PlannedStep {
    /// The stage it runs in, from 1: a stage starts once the steps it waits
    /// for are done; the steps of one stage run side by side.
    pub stage: u32,
    /// The step's name.
    pub step: String,
    /// `handler`, `flow`, `workflow` or `signal`.
    pub kind: String,
    /// What it runs: the handler, flow or workflow name, or the signal.
    pub target: String,
    /// The steps it waits for.
    pub after: Vec<String>,
    /// Its condition, if it has one.
    pub condition: Option<String>,
    /// The array it maps over, if it fans out.
    pub fan_out: Option<String>,
    /// Where it loops back to, and how often at most.
    pub loop_to: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_definition() {
        let flow = Flow::new("review")
            .queue("docs")
            .step("draft")
            .step("review")
            .after(["draft"])
            .input_field("text", "$.draft")
            .step("revise")
            .handler("edit")
            .after(["review"])
            .when("$.review.ok == false")
            .goto("review", 3)
            .retry(5, Duration::from_secs(1), Duration::from_secs(30))
            .timeout(Duration::from_millis(1500));
        let def = flow.definition();
        assert_eq!(def["queue"], "docs");
        assert_eq!(def["steps"][1]["input"], json!({"text": "$.draft"}));
        assert_eq!(def["steps"][2]["handler"], "edit");
        assert_eq!(def["steps"][2]["goto"], json!({"step": "review", "max": 3}));
        assert_eq!(def["steps"][2]["retry"]["max_attempts"], 5);
        assert_eq!(def["steps"][2]["timeout"], 1.5);
        assert!(flow.checked().is_ok());
    }

    #[test]
    fn a_step_method_before_any_step_is_an_error() {
        let flow = Flow::new("f").when("$.x").step("a");
        let err = flow.checked().unwrap_err().to_string();
        assert!(err.contains("when before any step"), "{err}");
    }
}
