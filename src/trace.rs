//! Trace context: the producer's, stored with a job or run at enqueue so the
//! trace continues in whichever worker runs it, and an attempt's, current
//! while its handler runs so the handler's own spans nest under it.

use std::future::Future;

use crate::plugin::{Attempt, Plugins};

/// The current trace context as a W3C `traceparent`, if it has a span: the
/// current `tracing` span's (through `tracing-opentelemetry`), else the
/// current OpenTelemetry context's.
#[cfg(feature = "otel")]
pub(crate) fn current_traceparent() -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    crate::otel::traceparent_of(&tracing::Span::current().context())
        .or_else(|| crate::otel::traceparent_of(&opentelemetry::Context::current()))
}

#[cfg(not(feature = "otel"))]
pub(crate) fn current_traceparent() -> Option<String> {
    None
}

/// The context a plugin gave an attempt, if any (always none without the
/// `otel` feature).
#[derive(Clone, Default)]
pub(crate) struct AttemptContext(#[cfg(feature = "otel")] Option<opentelemetry::Context>);

impl AttemptContext {
    /// Asks the plugins for the attempt's context.
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    pub fn of(plugins: &Plugins, attempt: Attempt<'_>) -> Self {
        #[cfg(feature = "otel")]
        return Self(plugins.attempt_context(attempt));
        #[cfg(not(feature = "otel"))]
        Self()
    }

    /// Runs `work` with the context current (hooks).
    pub fn enter<R>(&self, work: impl FnOnce() -> R) -> R {
        #[cfg(feature = "otel")]
        if let Some(cx) = &self.0 {
            let _current = cx.clone().attach();
            return work();
        }
        work()
    }

    /// `future`, with the context current whenever it is polled.
    #[cfg(feature = "otel")]
    pub fn wrap<F: Future>(
        &self,
        future: F,
    ) -> futures_util::future::Either<opentelemetry::context::WithContext<F>, F> {
        use opentelemetry::context::FutureExt;
        match &self.0 {
            Some(cx) => futures_util::future::Either::Left(future.with_context(cx.clone())),
            None => futures_util::future::Either::Right(future),
        }
    }

    /// `future`, as is: there is no context without the `otel` feature.
    #[cfg(not(feature = "otel"))]
    pub fn wrap<F: Future>(&self, future: F) -> F {
        future
    }
}
